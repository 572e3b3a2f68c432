"""What a forked child inherits of the client, and how it is kept from using it (Note [forked children]).

Note [forked children]
----------------------
`os.fork()` (a DataLoader worker under the "fork" start method, a subprocess that forks) copies the
trainer's memory, so the child holds copies of every live optimizer and connection: the parent's session
reference, its gRPC channel, its step channel socket, its finalizers and the atexit hook of its private
daemon. Used from the child, each of them acts on the parent's session: at the child's exit the
optimizer's finalizer detached the parent's session, then hung, for the child's copy of the gRPC channel
has none of the threads that served it (gRPC's fork support is off by default, and even on it does not
carry a channel across a fork).

So the objects a child inherits are disowned the moment it starts (os.register_at_fork, after_in_child):

- their finalizers are detached, so neither garbage collection nor exit in the child detaches anything;
- every use (step, zero_grad, state_dict, load_state_dict, checkpoint, add_param_group) raises
  InheritedSessionError, naming the process the optimizer belongs to, before anything reaches the
  daemon or the shared arenas (zero_grad would zero the parent's gradients, which live there);
- close() in the child releases nothing of the parent's and returns: the parent still trains;
- nothing in the child calls into the inherited gRPC channel, not even to close it, and the child's
  copies are kept referenced until the process ends, so that no gRPC destructor runs in it; the step
  channel's socket is never shut down (that would cut the parent's connection; the child's copy of the
  file descriptor just closes with the process);
- the private daemon (stated_client.embedded) is the parent's: the child's exit neither stops it nor
  removes its directory, and an optimizer the child makes gets the child's own.

The check is by pid as well (`owner != os.getpid()`), so a child made by a fork that skipped the
at-fork hooks (os.fork through ctypes, say) is still refused. A child that trains makes its own
optimizer, which attaches its own session. The model's parameters remain views of the parent's arenas
(shared memory): the child sees them change with the parent's steps, and writing them writes the
parent's.
"""

from __future__ import annotations

import os
import threading
import weakref

from stated_client.errors import InheritedSessionError

# Objects with a `disown()` method, made in this process: the optimizers and connections still alive.
_owned: "weakref.WeakSet" = weakref.WeakSet()
_owned_lock = threading.Lock()
# In a child: what it inherited, referenced until the process ends (Note [forked children]).
_inherited: list = []


def own(obj) -> int:
    """Registers `obj` to be disowned in forked children; returns the pid it belongs to."""
    with _owned_lock:
        _owned.add(obj)
    return os.getpid()


def inherited_error(what: str, owner: int, target: str) -> InheritedSessionError:
    return InheritedSessionError(
        f"this {what} belongs to process {owner}, whose session with the stated daemon at {target} it holds; "
        f"this process ({os.getpid()}) is a fork of it (a DataLoader worker, a forked subprocess) and may not "
        f"use it: the parent goes on training with it. Create this process's own optimizer (for example "
        f"stated.AdamW(model.parameters())) if it trains, or start it with the 'spawn' start method")


def check_owner(owner: int, what: str, target: str) -> None:
    """Raises InheritedSessionError in any process but `owner`."""
    if os.getpid() != owner:
        raise inherited_error(what, owner, target)


class Owned:
    """For the optimizers: `_owner` (from `own`), `_finalizer` and `_connection` are set by the subclass."""

    _owner: int

    def disown(self) -> None:
        """In a forked child: neither garbage collection nor exit detaches the parent's session from here."""
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer.detach()

    def _check_owner(self) -> None:
        """InheritedSessionError in a forked child, before anything reaches the daemon or the arenas."""
        check_owner(self._owner, type(self).__name__, self._connection.target)


def _in_child() -> None:
    global _owned_lock
    _owned_lock = threading.Lock()  # another thread of the parent may have held it at the fork
    inherited = list(_owned)
    _owned.clear()
    for obj in inherited:
        try:
            obj.disown()
        except Exception:  # noqa: BLE001 - a hook that raises would only print in the child; the pid check remains
            pass
    _inherited.extend(inherited)


os.register_at_fork(after_in_child=_in_child)
