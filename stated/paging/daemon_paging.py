"""The daemon-wide side of paging: the host-memory budget, the jobs' state files, each session's pager.

Without --host-memory every page stays in host memory (ResidentPager). With it, each job gets a share
of the budget (Note [max-min budget sharing] in stated.paging.budget), split between the job's sessions the
same way, and each session's DiskPager keeps that many pages resident and streams the rest from the
job's state file. One state file per job under --state-dir; the sessions (ranks) of a job own
disjoint ranges of its pages.
"""

from __future__ import annotations

import dataclasses
import logging
import threading

from stated.metrics import Metrics
from stated.paging.budget import Demand, HostBudget, share_budget
from stated.paging.disk_pager import DiskPager
from stated.paging.host_pool import Pinner
from stated.paging.pager import Pager
from stated.paging.resident_pager import ResidentPager
from stated.paging.state_file import StateFile, align_up
from stated.session import Session

log = logging.getLogger("stated.paging.daemon_paging")


@dataclasses.dataclass
class JobFile:
    file: StateFile
    next_page: int = 0
    sessions: int = 0


class Paging:
    def __init__(self, metrics: Metrics, host_memory: int | None = None, state_dir: str = "",
                 prefetch_depth: int = 4):
        self.metrics = metrics
        self.host_memory = host_memory
        self.state_dir = state_dir
        self.depth = prefetch_depth
        self.budget = HostBudget(host_memory) if host_memory is not None else None
        self.files: dict[str, JobFile] = {}
        self.sessions: dict[str, list[Session]] = {}
        # Registrations of one job's ranks run on several threads at once; they share its state file.
        self._lock = threading.Lock()

    @property
    def limited(self) -> bool:
        return self.budget is not None

    def new_pager(self, session: Session) -> Pager:
        """The pager a session keeps for its life, made at Attach (before it has pages)."""
        if self.budget is None:
            return ResidentPager(session)
        return DiskPager(session, depth=self.depth, metrics=self.metrics)

    def feed_device(self, session: Session, pinner: Pinner) -> None:
        """The session's pages feed a GPU from now on: its host pages are page-locked by `pinner`."""
        session.pager.pin_host_pages(pinner)

    def added_pages(self, session: Session, pages: int) -> None:
        """After a Register: reserve the new pages in the job's state file (so a full disk is reported
        now, not in a step) and reshare the budget. Raises DiskSpaceError / StateDirError."""
        if self.budget is None:
            return
        with self._lock:
            self._add_pages(session, pages)

    def _add_pages(self, session: Session, pages: int) -> None:
        slot = align_up(session.page_bytes)  # a state file slot
        job = self.files.get(session.job)
        if job is None:
            job = JobFile(StateFile.create(self.state_dir, session.job, session.page_bytes, pages))
            self.files[session.job] = job
        else:
            job.file.grow(job.next_page + pages)
        first = job.next_page
        job.next_page += pages
        members = self.sessions.setdefault(session.job, [])
        if session not in members:
            job.sessions += 1
            members.append(session)
        _disk_pager(session).extend(job.file, first)
        job_bytes = sum(len(s.table) for s in self.sessions[session.job]) * slot
        self._apply(self.budget.set_job(session.job, job_bytes, slot))

    def removed(self, session: Session) -> None:
        """After a session detached: its pager closes, its job's file goes with the job's last session."""
        session.pager.close()
        if self.budget is None:
            return
        with self._lock:
            self._remove(session)

    def _remove(self, session: Session) -> None:
        if session.job not in self.sessions:
            return
        members = self.sessions[session.job]
        if session in members:
            members.remove(session)
        job = self.files[session.job]
        job.sessions -= 1
        if job.sessions <= 0:
            job.file.remove()
            del self.files[session.job]
            del self.sessions[session.job]
            self._apply(self.budget.remove_job(session.job))
        else:
            self._split(session.job, self.budget.capacity(session.job))

    def _apply(self, changes) -> None:
        for change in changes:
            self._split(change.job, change.new)

    def _split(self, job: str, capacity: int) -> None:
        """A job's pages of budget, shared between its sessions by the same max-min rule."""
        members = self.sessions.get(job, [])
        if not members:
            return
        slot = align_up(members[0].page_bytes)
        demands = {s.id: Demand(len(s.table) * slot, slot) for s in members}
        shares = share_budget(capacity * slot, demands)
        for s in members:
            _disk_pager(s).request_capacity(shares[s.id])

    def close(self) -> None:
        for job in self.files.values():
            job.file.remove()
        self.files.clear()


def _disk_pager(session: Session) -> DiskPager:
    """The pager of a session under a host budget (new_pager made it)."""
    pager = session.pager
    if not isinstance(pager, DiskPager):
        raise TypeError(f"session {session.id} has a {type(pager).__name__}, not the budget's DiskPager")
    return pager
