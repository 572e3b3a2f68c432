"""GetStats, and who may see and drop which jobs (Note [who sees what] in stated.server.admin_file);
stated.server.servicer inherits these calls."""

from __future__ import annotations

from stated import __version__
from stated.errors import PermissionDenied
from stated.server.admin_file import AdminFile
from stated.server.job_table import job_stats
from stated.server.status_codes import rpc
from stated.session import Session
from stated.v1 import state_service_pb2 as pb

# A GetStats scope: every job (None), one job (its name), or none (totals only).
TOTALS = ""


class StatsCalls:
    """Needs the servicer's store and `_session`; `admin` is set by the daemon (None: no admin token, so
    only sessions see their own jobs)."""

    admin: AdminFile | None = None

    def _visible_job(self, session: pb.SessionRef, admin_token: bytes, field: str) -> str | None:
        """Which job a request may see: None for every job (the admin token), a session's job, or TOTALS;
        a token that does not match raises PermissionDenied."""
        if admin_token:
            if self.admin is None:
                raise PermissionDenied(f"{field} was sent, but this daemon has no admin token")
            self.admin.check(admin_token, field)
            return None
        if session.id or session.token:
            return self._session(session).job
        return TOTALS

    def check_may_drop(self, request: pb.DropRequest) -> None:
        """Drop needs the admin token or a live session of the job it drops; PermissionDenied names both."""
        job = self._visible_job(request.session, request.admin_token, "admin_token")
        if job is None or (job != TOTALS and job == request.job):
            return
        where = self.admin.path if self.admin is not None else "<socket>.admin"
        whose = "no session" if job == TOTALS else f"a session of job {job!r}"
        raise PermissionDenied(f"dropping job {request.job!r} needs the daemon's admin token (the file {where}, "
                               f"which `stated drop` reads when run as the daemon's user or root) or a live "
                               f"session of that job; the request carried {whose}")

    @rpc
    async def GetStats(self, request: pb.GetStatsRequest, context) -> pb.GetStatsResponse:
        job = self._visible_job(request.session, request.admin_token, "admin_token")
        every = list(self.store.sessions.values())
        reply = pb.GetStatsResponse(
            daemon_version=__version__, state_bytes=sum(s.state_bytes for s in every),
            resident_bytes=sum(s.pager.resident_bytes for s in every), page_bytes=self.store.page_bytes,
            live_sessions=len(every), retained_ranks=len(self.store.keeper.held))
        if job == TOTALS:
            reply.scope = pb.STATS_SCOPE_TOTALS
            return reply
        reply.scope = pb.STATS_SCOPE_ALL if job is None else pb.STATS_SCOPE_JOB
        reply.sessions.extend(session_stats(s) for s in every if job is None or s.job == job)
        reply.jobs.extend(j for j in job_stats(self.store) if job is None or j.job == job)
        return reply


def session_stats(s: Session) -> pb.SessionStats:
    params = s.parameters
    return pb.SessionStats(
        id=s.id, job=s.job, rank=s.rank, algorithm=s.algorithm.name, pid=s.pid, tensors=len(s.tensors),
        parameters=params, state_bytes=s.state_bytes, steps=s.steps,
        state_bytes_per_parameter=s.state_bytes / params if params else 0.0, pages=len(s.table),
        resident_capacity=s.pager.resident_pages, page_faults=s.pager.faults,
        bytes_read=s.pager.bytes_read, bytes_written=s.pager.bytes_written,
        stall_seconds=s.stall_seconds, step_seconds=s.step_seconds, **_inconsistency(s))


def _inconsistency(session: Session) -> dict:
    """SessionStats' fields for a session a failure left half-applied (stated.inconsistency)."""
    failed = session.inconsistent
    if failed is None:
        return {}
    return {"inconsistent": True, "failed_step": failed.step, "inconsistency": failed.describe()}
