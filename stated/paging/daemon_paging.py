"""The daemon-wide side of paging: the host-memory budget, the jobs' state files, each session's pager.

Without --host-memory every page stays in host memory (ResidentPager). With it, each job gets a share
of the budget (Note [max-min budget sharing] in stated.paging.budget), split between the job's sessions the
same way, and each session's DiskPager keeps that many pages resident and streams the rest from its
state file. One state file per session, (job, rank), under --state-dir: a checkpoint freezes its
session's file (Note [frozen state files] in stated.paging.state_file), which must hold no other rank's
pages.
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
class SessionFile:
    file: StateFile
    owner: Session  # its id changes when a trainer re-attaches; the session stays
    pages: int = 0


class Paging:
    def __init__(self, metrics: Metrics, host_memory: int | None = None, state_dir: str = "",
                 prefetch_depth: int = 4):
        self.metrics = metrics
        self.host_memory = host_memory
        self.state_dir = state_dir
        self.depth = prefetch_depth
        self.budget = HostBudget(host_memory) if host_memory is not None else None
        self.files: dict[tuple[str, int], SessionFile] = {}  # (job, rank) -> its state file
        self.sessions: dict[str, list[Session]] = {}
        # Registrations of one job's ranks run on several threads at once; they share its budget.
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
        """After a Register: reserve the new pages in the session's state file (so a full disk is reported
        now, not in a step) and reshare the budget. Raises DiskSpaceError / StateDirError."""
        if self.budget is None:
            return
        with self._lock:
            self._add_pages(session, pages)

    def _add_pages(self, session: Session, pages: int) -> None:
        slot = align_up(session.page_bytes)  # a state file slot
        key = (session.job, session.rank)
        own = self.files.get(key)
        if own is None or own.owner is not session:
            # Another session of this (job, rank) still has its file: one being replaced by a session
            # built from a checkpoint (stated.durability.resume). The new one takes the name.
            created = StateFile.create(self.state_dir, session.job, session.page_bytes, pages, session.rank,
                                       replace=own is not None)
            own = self.files[key] = SessionFile(created, session)
        else:
            own.file.grow(own.pages + pages)
        first = own.pages
        own.pages += pages
        members = self.sessions.setdefault(session.job, [])
        if session not in members:
            members.append(session)
        _disk_pager(session).extend(own.file, first)
        job_bytes = sum(len(s.table) for s in self.sessions[session.job]) * slot
        self._apply(self.budget.set_job(session.job, job_bytes, slot))

    def removed(self, session: Session) -> None:
        """After a session detached: its pager closes and its state file goes."""
        session.pager.close()
        if self.budget is None:
            return
        with self._lock:
            self._remove(session)

    def _remove(self, session: Session) -> None:
        if session.job not in self.sessions:
            return
        members = self.sessions[session.job]
        if session not in members:
            return
        members.remove(session)
        own = self.files.get((session.job, session.rank))
        if own is not None and own.owner is session:
            del self.files[(session.job, session.rank)]
        pager = _disk_pager(session)
        if pager.file is not None:
            pager.file.remove()  # a replaced session's file lost its name already: only closed
        if not members:
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
        for own in self.files.values():
            own.file.remove()
        self.files.clear()


def _disk_pager(session: Session) -> DiskPager:
    """The pager of a session under a host budget (new_pager made it)."""
    pager = session.pager
    if not isinstance(pager, DiskPager):
        raise TypeError(f"session {session.id} has a {type(pager).__name__}, not the budget's DiskPager")
    return pager
