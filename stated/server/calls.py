"""How the servicer's handlers run: blocking work goes to the thread pool and outlives a cancelled call
(`run_to_end`), and waits are bounded (`is_set_within`); `rpc` (stated.server.status_codes) turns their
errors into statuses.

Note [work outlives its call]
-----------------------------
gRPC cancels a handler when its client goes away (a trainer killed with kill -9 mid-step, mid-checkpoint,
mid-resume), but no cancellation stops the worker thread that does the call's work. A handler that gave
up at once would leave the session's lock, or the jobs lock, while that thread still changes the session:
a trainer resuming it could step during the checkpoint (which would then hold pages of two steps),
`stated drop` could free its memory under the thread, a resume's new session would stay attached with
no one to detach it. So a cancelled handler first waits for its work to end, keeping whatever lock it
holds, and hands a result no one will read to `abandoned` (the Attach's undo); then it is cancelled.
"""

from __future__ import annotations

import asyncio


async def run_to_end(pool, fn, *args, abandoned=None):
    """fn(*args) on `pool`; a caller cancelled meanwhile waits for it to end before it is cancelled, and
    `abandoned(result)` undoes what a finished fn did for it (Note [work outlives its call])."""
    work = asyncio.get_running_loop().run_in_executor(pool, fn, *args)
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        while not work.done():
            try:
                await asyncio.wait([work])
            except asyncio.CancelledError:
                pass  # cancelled again: the work still runs, and the lock must stay held until it ends
        if abandoned is not None and not work.cancelled() and work.exception() is None:
            abandoned(work.result())
        raise


async def is_set_within(event: asyncio.Event, seconds: float | None) -> bool:
    """Whether `event` is set within `seconds` (None: waits until it is)."""
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except asyncio.TimeoutError:
        return False
    return True
