"""Whether the daemon still lives, as one connection sees it, and what the trainer is told when it does not.

Note [liveness]: the optimizer holds a Watch stream open for its session's life (stated.server.servicer),
and asks the daemon for a keepalive on it every `timeout / 4` seconds (at most 5 s). A thread reads the
stream and records the time of every message; every reply to a call counts as a sign of life too. The
daemon sends keepalives from its event loop, which no long step occupies (steps run on step channel
threads or the step pool, page transfers on the pager's threads; only a small session's gRPC step runs on
the loop, for milliseconds), so a long paged step is not silence.

A daemon that shows no sign of life for `STATED_TIMEOUT` seconds is given up on: a monitor thread wakes
every slice (a quarter of the timeout, at most 1 s) and cuts the calls in flight (a gRPC call is
cancelled, the step channel's socket is shut down), so a step on a stopped daemon (SIGSTOP, a hang) fails
within the timeout plus a slice instead of blocking forever. A daemon that shuts down (SIGTERM) ends the
Watch stream with UNAVAILABLE, and one that dies (kill -9) breaks it; either way the next call fails at
once. A call already under way is left to finish (a daemon that shuts down completes the step it is
applying), or to fail when the daemon's sockets close. Every such failure is a DaemonUnavailableError that
says which daemon stopped and how to go on, and once given the verdict stands for the connection: a step
cut off may or may not have been applied, so the optimizer cannot safely go on with that daemon.

STATED_TIMEOUT=0 waits forever, as the client did before keepalives.

Why 60 s by default: a healthy daemon's event loop answers within milliseconds, and 60 s is twelve
keepalives missed in a row, which covers what delays a healthy daemon or this process's watch thread (a
garbage collection, CuPy loading at a job's first CUDA registration, swapping, a node loaded with
trainers), while a hung daemon fails the trainer within a minute, long before torch.distributed's
collective timeouts (ten minutes and more) would fail its peers with a message about someone else.
"""

from __future__ import annotations

import math
import os
import threading
import time
from contextlib import contextmanager
from typing import Callable

import grpc

from stated_client.errors import DaemonUnavailableError, InternalError, InvalidArgumentError, StatedError, from_rpc_error
from stated_client.protocol import SHUTTING_DOWN

ENV_TIMEOUT = "STATED_TIMEOUT"
DEFAULT_TIMEOUT = 60.0
MAX_KEEPALIVE_SECONDS = 5.0
MAX_SLICE_SECONDS = 1.0

RESTART = ("once a daemon runs again on the same --state-dir (`stated serve`), make the optimizer again with "
           "resume=True: it continues from the daemon's last checkpoint (opt.checkpoint(), --checkpoint-every, or the "
           "one a daemon stopped with SIGTERM writes), and opt.resumed_step says which step. Without a checkpoint, "
           "restart training from your last saved state (opt.load_state_dict() into a new optimizer)")


def timeout_from_env() -> float | None:
    """STATED_TIMEOUT in seconds (default 60); None for 0 or inf (wait forever)."""
    text = os.environ.get(ENV_TIMEOUT, "").strip()
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # negative or nan
        raise InvalidArgumentError(f"{ENV_TIMEOUT}={text!r} is not a number of seconds >= 0 (default "
                                   f"{DEFAULT_TIMEOUT:g}; 0 waits forever for a daemon that stopped answering)")
    return None if value == 0 or math.isinf(value) else value


def keepalive_seconds(timeout: float | None) -> float:
    """How often the daemon is asked for a keepalive; 0 (none) when waiting forever."""
    return min(MAX_KEEPALIVE_SECONDS, timeout / 4) if timeout else 0.0


def stopped_error(target: str, detail: str) -> DaemonUnavailableError:
    why = "it is shutting down" if detail == SHUTTING_DOWN else detail
    return DaemonUnavailableError(f"the stated daemon at {target} stopped ({why}). Its optimizer state is kept as of "
                                  f"its last checkpoint: {RESTART}.")


def silent_error(target: str, silent: float, timeout: float) -> DaemonUnavailableError:
    return DaemonUnavailableError(
        f"the stated daemon at {target} gave no sign of life for {silent:.1f} s ({ENV_TIMEOUT} is {timeout:g} s): it "
        f"is stopped (SIGSTOP?) or hung, and this optimizer gives up on it. Restart the daemon; {RESTART}. If "
        f"the daemon is only slow, raise {ENV_TIMEOUT}.")


class Liveness:
    """The daemon's signs of life for one connection and the verdict on them (Note [liveness])."""

    def __init__(self, target: str, timeout: float | None):
        self.target = target
        self.timeout = timeout
        self.last = time.monotonic()
        # Why the daemon ended or broke the Watch stream (it stopped); None while the stream is open.
        self.ended: str | None = None
        # Once given, every later call gets it (a call cut off may or may not have been applied).
        self.verdict: DaemonUnavailableError | None = None
        self._watch = None
        self._first = threading.Event()
        self._refusal: grpc.RpcError | None = None
        self._opened = False
        # The daemon ended the Watch stream cleanly: the session is gone (its calls are answered NOT_FOUND),
        # and with no more keepalives to come silence no longer tells anything.
        self._session_ended = False
        self._cuts: set[Callable[[], None]] = set()
        self._guard = threading.Lock()
        self._stop = threading.Event()

    # --- the Watch stream ------------------------------------------------------------------------

    def follow(self, watch) -> None:
        """Reads the Watch call `watch` on a thread from now on; returns once its first reply came. A refusal
        raises the StatedError, and no first reply within the timeout DaemonUnavailableError."""
        self._watch = watch
        threading.Thread(target=self._read, name="stated-watch", daemon=True).start()
        arrived = self._first.wait(self.timeout)
        if not arrived or not self._opened:
            watch.cancel()
            if not arrived:
                raise silent_error(self.target, time.monotonic() - self.last, self.timeout)
            if self._refusal is not None:
                raise from_rpc_error(self._refusal, self.target)
            raise InternalError(f"the stated daemon at {self.target} ended Watch before its first reply")
        if self.timeout is not None:
            threading.Thread(target=self._monitor, name="stated-liveness", daemon=True).start()

    def _read(self) -> None:
        try:
            for _ in self._watch:
                self.alive()
                self._opened = True
                self._first.set()
            self._session_ended = True
        except grpc.RpcError as error:
            if not self._opened:
                self._refusal = error
            elif not self._stop.is_set():
                details = error.details() or error.code().name
                self.ended = details if details == SHUTTING_DOWN else f"its Watch stream broke: {details}"
        except Exception as exc:  # noqa: BLE001 - the thread must not die with a traceback on the trainer
            self.ended = f"its Watch stream failed: {type(exc).__name__}: {exc}"
        finally:
            self._first.set()

    def cancel(self) -> None:
        """Ends the Watch stream and the monitor (the optimizer's close)."""
        self._stop.set()
        if self._watch is not None:
            self._watch.cancel()

    # --- signs of life and the verdict -----------------------------------------------------------

    def alive(self) -> None:
        self.last = time.monotonic()

    def check(self) -> None:
        """Raises the verdict, if the daemon stopped or was given up on; a call starts only after this."""
        if self.verdict is None and self.ended is not None:
            self.verdict = stopped_error(self.target, self.ended)
        if self.verdict is None:
            self._silent()
        if self.verdict is not None:
            raise self.verdict

    def explain(self, error: StatedError, detail: str) -> StatedError:
        """What a failed call raises: the verdict if there is one; for a daemon that went away (UNAVAILABLE,
        a broken socket) the sentence of a stopped daemon, which becomes the verdict; else `error`."""
        if self.verdict is None and self.ended is not None:
            self.verdict = stopped_error(self.target, self.ended)
        if self.verdict is None and isinstance(error, DaemonUnavailableError):
            self.verdict = stopped_error(self.target, detail)
        return self.verdict or error

    def _silent(self) -> bool:
        """Gives the verdict when the daemon has been silent for longer than the timeout."""
        silent = time.monotonic() - self.last
        if self.timeout is None or silent <= self.timeout or self._session_ended:
            return False
        if self.verdict is None:
            self.verdict = silent_error(self.target, silent, self.timeout)
        return True

    # --- calls in flight -------------------------------------------------------------------------

    @contextmanager
    def watching(self, cut: Callable[[], None]):
        """Runs the block as a call in flight, which `cut()` ends if the daemon falls silent meanwhile."""
        with self._guard:
            self._cuts.add(cut)
        try:
            yield
        finally:
            with self._guard:
                self._cuts.discard(cut)

    def _monitor(self) -> None:
        step = min(MAX_SLICE_SECONDS, self.timeout / 4)
        while not self._stop.wait(step):
            with self._guard:
                if not self._cuts or not self._silent():
                    continue
                cuts, self._cuts = list(self._cuts), set()
            for cut in cuts:
                try:
                    cut()
                except Exception:  # noqa: BLE001 - a call that ended meanwhile
                    pass
