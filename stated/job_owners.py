"""Which user owns a job, and who may attach to it.

Note [job owners]
-----------------
gRPC over a unix socket does not tell a Python server who called, but a plain unix socket does
(SO_PEERCRED, which the kernel fills in and the caller cannot forge). So before Attach the client asks
the step-channel socket for a credential: the daemon reads the connection's uid, answers with 16 random
bytes, and remembers that those bytes stand for that uid. The client sends them in AttachRequest.credential;
each is good for one Attach within CREDENTIAL_SECONDS.

The uid that attaches first owns the job (every rank of it): its live sessions, the state retained when its
trainers die, and its checkpoints (the manifest records the owner, so a restarted daemon knows it too).
Another uid's Attach to an owned job is PERMISSION_DENIED naming the owner, so no user of a shared daemon
can resume, import into, or squat a (job, rank) of another's; root and the daemon's own user may attach to
any job (they can read every file of it anyway). A job attached without a credential (a hand-written gRPC
client, or a daemon reached over TCP) has no owner and stays open to anyone, and an Attach without one is
refused on an owned job.

A new job's name is first come, first served: a user who attaches first to a name another user meant to
use owns it. Several users of one daemon therefore give their jobs names of their own (SECURITY.md).
"""

from __future__ import annotations

import os

from stated.errors import PermissionDenied
from stated.job_accounting import sessions_in_memory


def owner_of(store, job: str) -> int | None:
    """The uid that owns `job`: that of its live sessions, its retained state, or its checkpoints."""
    for session in sessions_in_memory(store):
        if session.job == job and session.owner is not None:
            return session.owner
    for held in store.keeper.held.values():
        if held.job == job and held.session is None and held.manifest.owner is not None:
            return held.manifest.owner  # recovered: its owner is in its checkpoint
    return None


def may_take(uid: int | None, owner: int | None) -> bool:
    """Whether a trainer of `uid` (None: unknown) may attach to a job owned by `owner` (None: nobody)."""
    return owner is None or uid in (owner, 0, os.getuid())


def check_owner(session, uid: int) -> None:
    """Refuses a step-channel connection of another uid than the one that attached the session (a token
    that leaked is still no way in for another user)."""
    if not may_take(uid, session.owner):
        raise PermissionDenied(f"session {session.id} of job {session.job!r} belongs to uid {session.owner}; "
                               f"this connection comes from uid {uid}")


def owner_refusal(job: str, uid: int | None, owner: int) -> PermissionDenied:
    """The refusal of an Attach by `uid` to a job that `owner` owns."""
    if uid is None:
        return PermissionDenied(f"job {job!r} belongs to uid {owner}, and this Attach carries no credential "
                                f"(the stated client gets one from the daemon's step socket; an Attach without one "
                                f"may only use jobs that nobody owns)")
    return PermissionDenied(f"job {job!r} belongs to uid {owner}; uid {uid} may not attach to it (pick another job "
                            f"name, or run as that user)")
