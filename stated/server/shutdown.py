"""At SIGTERM: every session whose state changed since its last checkpoint is made durable, within a
bound (`stated serve --shutdown-timeout`); those that do not make it stay at their last checkpoint."""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("stated.server.shutdown")


async def checkpoint_all(servicer, seconds: float) -> tuple[int, int]:
    """Checkpoints every live and retained session whose state changed since its last checkpoint, for
    at most `seconds` in all; returns (made durable, left at their last checkpoint)."""
    store = servicer.store
    if not store.state_dir:
        return 0, 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    sessions = list(store.sessions.values()) + [e.session for e in store.keeper.held.values() if e.session]
    done = left = 0
    for session in sessions:
        if not store.has_news(session):
            continue
        try:
            await _checkpoint_within(servicer, session, deadline)
            done += 1
        except asyncio.TimeoutError:
            left += 1
            store.abandon.set()  # a checkpoint behind a step that holds the lock gives up too
            log.warning("shutdown: job=%s rank=%d not made durable within --shutdown-timeout; it stays at its "
                        "last checkpoint (%s)", session.job, session.rank,
                        f"step {session.durable.step}" if session.durable else "none")
        except Exception as exc:  # noqa: BLE001
            left += 1
            log.error("shutdown: checkpoint of job=%s rank=%d failed: %s", session.job, session.rank, exc)
    return done, left


async def _checkpoint_within(servicer, session, deadline: float) -> None:
    """One checkpoint under the session's lock, given up (TimeoutError) at `deadline`; a checkpoint
    given up half-way leaves the previous one whole (Note [checkpoint order])."""
    loop = asyncio.get_running_loop()
    if deadline - loop.time() <= 0:
        raise asyncio.TimeoutError
    lock = servicer.locks.get(session.id)
    if lock is not None:
        await asyncio.wait_for(lock.acquire(), deadline - loop.time())
    try:
        work = asyncio.ensure_future(servicer._run(servicer._checkpoint, session))  # counted and logged as any
        try:
            await asyncio.wait_for(asyncio.shield(work), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            servicer.store.abandon.set()  # it stops at its next page and removes what it wrote
            outcome = (await asyncio.gather(work, return_exceptions=True))[0]
            if isinstance(outcome, BaseException):
                raise asyncio.TimeoutError from None
            # It had got past its last page: it finished, and is durable.
    finally:
        if lock is not None:
            lock.release()
