"""Ending a client session: the optimizer's finalizer, which detaches from the daemon (at close(), garbage
collection or exit) and never raises; in any process but the session's own, it does nothing (Note [forked
children] in stated_client.fork_guard)."""

from __future__ import annotations

import os

from stated.v1 import state_service_pb2 as pb
from stated_client.connection import Connection
from stated_client.step_line import StepLine


def close_session(connection: Connection, session: pb.SessionRef, watch=None, line: StepLine | None = None,
                   keep: list[bool] | None = None) -> None:
    """Detaches (finalizer: runs at garbage collection or exit, never raises); `keep[0]` retains the state."""
    if os.getpid() != connection.owner:
        return  # a forked child's copy of the parent's session
    if line is not None:
        line.close()
    try:
        connection.call("Detach", pb.DetachRequest(session=session, keep=bool(keep and keep[0])), timeout=10)
    except Exception:
        pass
    try:
        if watch is not None:
            watch.cancel()
    except Exception:
        pass
    connection.close()
