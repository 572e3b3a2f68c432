"""The per-session lock: one session's operations in order, from the event loop and from plain threads.

Note [one lock for coroutines and threads]: gRPC handlers run as coroutines on the daemon's event loop,
step channel connections (stated.server.step_channel) on plain threads; both must serialize on the same
session. An asyncio.Lock cannot be taken by a thread, and a threading.Lock taken with a blocking call
would stall the loop; so the lock is a threading.Lock, taken with `with lock:` on a thread and with
`async with lock:` on the loop. The coroutine first tries without blocking (the usual case: free) and
otherwise waits in the loop's default executor. A coroutine cancelled while it waits cannot stop that
pending acquire, so the lock is released as soon as the acquire completes: a cancelled waiter never
leaves it held.
"""

from __future__ import annotations

import asyncio
import threading


class SessionLock:
    """A threading.Lock that coroutines can also take (Note [one lock for coroutines and threads])."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def locked(self) -> bool:
        return self._lock.locked()

    # --- threads ---------------------------------------------------------------------------------

    def __enter__(self) -> SessionLock:
        self.take()
        return self

    def take(self) -> None:
        """Takes the lock on a thread, blocking; `release` may come from another thread (a lock handed
        to a checkpoint behind the step, stated.server.servicer)."""
        self._lock.acquire()

    def __exit__(self, *exc) -> None:
        self._lock.release()

    # --- coroutines ------------------------------------------------------------------------------

    async def acquire(self) -> None:
        if self._lock.acquire(blocking=False):
            return
        pending = asyncio.get_running_loop().run_in_executor(None, self._lock.acquire)
        try:
            await asyncio.shield(pending)
        except asyncio.CancelledError:
            pending.add_done_callback(self._release_if_acquired)
            raise

    def _release_if_acquired(self, pending: asyncio.Future) -> None:
        if not pending.cancelled() and pending.exception() is None and pending.result():
            self._lock.release()

    def release(self) -> None:
        self._lock.release()

    async def __aenter__(self) -> SessionLock:
        await self.acquire()
        return self

    async def __aexit__(self, *exc) -> None:
        self._lock.release()
