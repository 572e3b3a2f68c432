"""What `stated jobs` and GetStats show of every (job, rank) the daemon holds: live, retained, recovered."""

from __future__ import annotations

from stated.durability.keeper import Retained
from stated.session import Session
from stated.store import Store
from stated.v1 import state_service_pb2 as pb


def _durable(session: Session | None, retained: Retained | None = None) -> dict:
    manifest = session.durable if session is not None else retained.manifest
    if manifest is None:
        return {"durable": False}
    return {"durable": True, "durable_step": manifest.step, "disk_bytes": manifest.data_bytes}


def _memory(session: Session) -> int:
    return session.pager.resident_bytes + sum(r.arena_bytes * 2 for r in session.regions if r.params is not None)


def live_stats(session: Session) -> pb.JobStats:
    return pb.JobStats(job=session.job, rank=session.rank, state="live", algorithm=session.algorithm.name,
                       step=session.steps, memory_bytes=_memory(session), retention_seconds_left=0.0,
                       inconsistent=session.inconsistent is not None, session_id=session.id, pid=session.pid,
                       **_durable(session))


def retained_stats(store: Store, entry: Retained) -> pb.JobStats:
    session = entry.session
    return pb.JobStats(job=entry.job, rank=entry.rank, state=entry.state, algorithm=entry.algorithm,
                       step=entry.step, memory_bytes=_memory(session) if session is not None else 0,
                       retention_seconds_left=store.keeper.seconds_left(entry),
                       inconsistent=session is not None and session.inconsistent is not None,
                       **_durable(session, entry))


def job_stats(store: Store) -> list[pb.JobStats]:
    """Every (job, rank), sorted by job then rank."""
    rows = [live_stats(s) for s in list(store.sessions.values())]
    rows += [retained_stats(store, e) for e in list(store.keeper.held.values())]
    return sorted(rows, key=lambda r: (r.job, r.rank))
