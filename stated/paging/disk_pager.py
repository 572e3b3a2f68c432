"""The pager for a host-memory budget smaller than the state: a fixed resident set, the rest streamed
through staging buffers from and to the job's state file.

Driven by the engine exactly like `ResidentPager` (stated.paging.pager). The residency policy
decides which pages stay (Note [cyclic scan eviction] in stated.paging.residency); the mover reads the pages
that will fault ahead of the cursor and writes evicted dirty pages behind it, so disk transfers overlap
the kernels (Note [capacity and staging]).

Note [slots of a session]
-------------------------
A session may hold `capacity` page slots (its share of --host-memory, stated.paging.budget). `staging` of
them are staging buffers: reads in flight ahead of the cursor, the page being worked on, and pages
being written back; the rest (`capacity - staging`) is the policy's resident set. A share too small
for that still gets two staging buffers, so a job always makes progress, at most two pages over its
share; the daemon logs that once.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import logging
import threading
import time

import torch

from stated.paging.state_file import StateFile
from stated.paging.host_pool import HostPool
from stated.metrics import Metrics
from stated.paging.page_table import PageEntry, Tier
from stated.paging.pager import Pager
from stated.paging.residency import ResidencyPolicy
from stated.paging.transfers import Mover

log = logging.getLogger("stated.paging.disk_pager")

MIN_STAGING = 2
# How far ahead of the cursor the policy is asked which pages will fault.
PLAN_WINDOW = 16


class DiskPager(Pager):
    """Made before the session has pages; `extend` gives it the state file and pages of each Register."""

    def __init__(self, session, depth: int, metrics: Metrics):
        self.session = session
        self.file: StateFile | None = None  # the job's, from the first Register on
        # File page of each session page (several sessions of one job share one file).
        self.file_pages: list[int] = []
        self.depth = depth
        self.metrics = metrics
        self.mover = Mover(depth=depth, name=f"stated-io-{session.id[:6]}")
        self.pool = HostPool(session.page_bytes, capacity=0)
        self.policy = ResidencyPolicy(0)
        self.capacity = -1
        self.staging = MIN_STAGING
        self._free: list[int] = []  # staging slots ready for a read
        self._lock = threading.Lock()
        self._writing: dict[int, cf.Future] = {}  # slot -> its write-back
        self._page_writes: dict[int, cf.Future] = {}  # page -> its latest write-back, until it lands
        self._reading: dict[int, tuple[int, cf.Future]] = {}  # page -> (slot it is read into, the read)
        self._transient: dict[int, int] = {}  # page -> staging slot, for pages the policy did not admit
        # Note [pages in flight]: pages between get() and done(). A backend with several pages in flight
        # retires a page (copies its result back into the host buffer) after later pages' get(); a page
        # evicted meanwhile must not be written to disk before that copy lands.
        self._in_use: set[int] = set()
        self._order: list[int] | None = None
        self._position: dict[int, int] = {}
        self.faults = 0
        self.bytes_read = 0
        self.bytes_written = 0
        self._wanted: int | None = 0  # no share until the daemon's Paging gives one

    # --- growth and budget ----------------------------------------------------------------------

    def extend(self, state_file: StateFile, first_file_page: int) -> None:
        """Maps the session's new pages (a Register) to consecutive pages of the job's state file."""
        self.file = state_file
        added = len(self.session.table) - len(self.file_pages)
        self.file_pages.extend(range(first_file_page, first_file_page + added))
        if self._wanted is None and self.capacity >= 0:
            self._wanted = self.capacity  # the split between resident and staging depends on the page count
        self.capacity = -1

    def request_capacity(self, capacity: int) -> None:
        """A new share, applied by this session's next operation (never in the middle of a step)."""
        self._wanted = capacity

    def _apply_wanted(self) -> None:
        if self._wanted is not None:
            wanted, self._wanted = self._wanted, None
            self.set_capacity(wanted)

    def set_capacity(self, capacity: int) -> None:
        """Applies a new share of the budget, in pages (Note [slots of a session])."""
        if capacity == self.capacity:
            return
        pages = len(self.session.table)
        if capacity >= pages:
            staging = 0  # everything fits: no page ever streams, so no staging buffers either
        else:
            # A backend with pages in flight holds that many host buffers at once, plus the one it faults.
            least = max(MIN_STAGING, self.session.backend.depth + 1)
            staging = max(least, min(2 * self.depth + 1, capacity // 2))
            if capacity < least:
                log.warning("job %s rank %d: its host share of %d pages is below the %d staging pages it needs; "
                            "it uses %d", self.session.job, self.session.rank, capacity, least, least)
        resident = min(pages, max(0, capacity - staging))
        for page in self.policy.resize(resident):
            self._evict(page)
        self.capacity, self.staging = capacity, staging
        self.pool.resize(resident + staging)

    # --- the engine's calls (stated.paging.pager) ----------------------------------------------

    def begin_pass(self, order: list[int]) -> None:
        self._apply_wanted()
        self._order = order
        self._position = {page: i for i, page in enumerate(order)}

    def get(self, page: int) -> tuple[torch.Tensor, float]:
        if self._order is None:
            self._apply_wanted()
        entry = self.session.table[page]
        self._in_use.add(page)
        if page in self.policy:
            self.policy.access(page)
            if page in self._reading:  # read ahead for a fault that did not come (the budget changed)
                self._drop_read(page)
            return self.pool.buffer(entry.slot), 0.0
        if page in self._transient:  # a repeated get of a page the policy did not keep
            return self.pool.buffer(self._transient[page]), 0.0
        self.faults += 1
        self.metrics.page_faults.labels("host").inc()
        self._prefetch(page, include=True)  # keep the reads ahead going before we wait for this one
        try:
            slot, waited = self._fault_in(entry)
        except BaseException:
            self._in_use.discard(page)  # never handed out: the engine gives back only what get returned
            raise
        decision = self.policy.access(page)
        if decision.evict is not None:
            self._evict(decision.evict)
        if decision.admitted:
            entry.tier, entry.slot = Tier.HOST, slot
        else:
            self._transient[page] = slot
            entry.slot = slot
        self._prefetch(page)
        return self.pool.buffer(slot), waited

    def _fault_in(self, entry: PageEntry) -> tuple[int, float]:
        """The slot that holds the faulted page now, and the seconds waited. A read that fails gives its
        slot back (a page that fails its checksum or a read error must not cost a slot for good)."""
        page = entry.page.index
        if page in self._reading:
            slot, future = self._reading.pop(page)
            ready = future.done()
            try:
                waited = self.mover.wait(page)
            except BaseException:
                self._release(slot)
                raise
            self.metrics.prefetch.labels("hit" if ready else "late").inc()
            return slot, waited
        start = time.perf_counter()
        slot = self._take_slot(block=True)
        try:
            with self._lock:
                pending = self._page_writes.get(page)
            if pending is not None:  # evicted a moment ago: its write must land before we read it back
                cf.wait([pending])
            self._fill(entry, slot)
        except BaseException:
            self._release(slot)
            raise
        return slot, time.perf_counter() - start

    def done(self, page: int, dirty: bool = True) -> None:
        self._in_use.discard(page)
        entry = self.session.table[page]
        if dirty:
            entry.dirty = True
        if page in self._transient:
            slot = self._transient.pop(page)
            entry.slot, entry.tier = None, Tier.DISK
            self.session.forget_binding(page)
            self._write_back(entry, slot)

    def end_pass(self) -> float:
        """Waits for the pass's write-backs, so their errors surface before the step replies; returns
        the seconds waited."""
        self._order = None
        return self.mover.drain()

    def abort_pass(self) -> None:
        """Drops the failed pass's reads ahead and waits for its writes, whose errors are logged: the
        step reports its own error, and the session is inconsistent (stated.inconsistency) until its
        state is replaced."""
        self._order = None
        for page in list(self._reading):
            self._drop_read(page)
        try:
            self.mover.drain()
        except Exception as exc:  # noqa: BLE001
            log.warning("job %s rank %d: a write-back of the failed step failed too: %s",
                        self.session.job, self.session.rank, exc)

    def reset(self, page: int) -> None:
        """Fresh (zero) state, as before the first step: dropped from memory and forgotten on disk."""
        entry = self.session.table[page]
        if page in self._reading:  # a read ahead of the old state must not fill the page later
            self._drop_read(page)
        if page in self.policy:
            self.policy.remove(page)
            self._release(entry.slot)
        entry.tier, entry.slot, entry.dirty, entry.checksum = Tier.NONE, None, False, None
        self.session.forget_binding(page)

    @property
    def resident_bytes(self) -> int:
        return sum(self.session.table[p].page.nbytes for p in self.policy.resident())

    @property
    def resident_pages(self) -> int:
        return len(self.policy.resident())

    @property
    def disk_bytes(self) -> int:
        return sum(e.page.nbytes for e in self.session.table if e.checksum is not None)

    def close(self) -> None:
        try:
            self.mover.drain()
        except Exception:  # the session is going away; its state with it
            pass
        self.mover.close()
        super().close()

    # --- checkpoints (stated.durability.checkpoint) -----------------------------------------------

    @property
    def can_freeze(self) -> bool:
        return self.file is not None

    def placed_in_file(self, pages: list[int]) -> tuple[dict[int, list[int]], list[int]]:
        placed, others = {}, []
        for page in pages:
            entry = self.session.table[page]
            if not entry.dirty and entry.checksum is not None and self.file.holds_current(self.file_pages[page]):
                placed[page] = [entry.checksum, self.file.offset_of(self.file_pages[page])]
            else:
                others.append(page)
        return placed, others

    def write_now(self, page: int, buffer: torch.Tensor) -> list[int]:
        """Clean from then on: its eviction writes nothing."""
        entry = self.session.table[page]
        entry.checksum = self.file.write(self.file_pages[page], buffer)
        entry.dirty = False
        self.metrics.transfer_bytes.labels("host_to_disk").inc(self.file.page_bytes)
        self.bytes_written += self.file.page_bytes
        return [entry.checksum, self.file.offset_of(self.file_pages[page])]

    def freeze(self, link: str) -> None:
        self.file.freeze(link)

    # --- moving pages ---------------------------------------------------------------------------

    def _fill(self, entry: PageEntry, slot: int) -> None:
        """Brings a page's state into `slot`: from the state file, or zeros for a fresh page."""
        if entry.tier == Tier.NONE:
            binding = self.session.bind(entry, self.pool.buffer(slot))
            self.session.init_page(binding, entry.page.index)
            entry.dirty = True
            return
        self.file.read(self.file_pages[entry.page.index], self.pool.buffer(slot), entry.checksum)
        self.metrics.transfer_bytes.labels("disk_to_host").inc(self.file.page_bytes)
        self.bytes_read += self.file.page_bytes
        entry.dirty = False

    def _prefetch(self, current: int, include: bool = False) -> None:
        """Starts reads for the pages that will fault next (from `current` on when `include`, else
        after it), as far as staging slots and depth allow."""
        if self._order is None or current not in self._position:
            return
        start = self._position[current] + (0 if include else 1)
        upcoming = itertools.islice(itertools.chain(self._order[start:], self._order[:start]), PLAN_WINDOW)
        for page in self.policy.plan(upcoming, self.mover.depth + len(self._reading)):
            if page in self._reading or (page == current and not include):
                continue
            if self.mover.room() <= 0:
                return
            entry = self.session.table[page]
            if entry.tier == Tier.NONE:
                continue  # a fresh page: nothing to read, it is zeroed when its turn comes
            if page in self.policy or page in self._transient:
                # Resident now, to be evicted by the access in progress: its write-back is not queued
                # yet, so a read now would overtake it. The next planning round reads it behind the write.
                continue
            slot = self._take_slot(block=False)
            if slot is None:
                return
            self._reading[page] = (slot, self.mover.submit_read(page, self._fill, entry, slot))

    def _evict(self, page: int) -> None:
        entry = self.session.table[page]
        slot = entry.slot
        self.metrics.page_evictions.labels("host").inc()
        if page in self._in_use:
            # Note [pages in flight]: a backend may still be computing on this page or copying it back
            # (stated.backends.base); it leaves at done(), as a page the policy never admitted does.
            self._transient[page] = slot
            return
        entry.slot = None
        entry.tier = Tier.DISK
        self.session.forget_binding(page)
        self._write_back(entry, slot)

    def _write_back(self, entry: PageEntry, slot: int) -> None:
        if not entry.dirty:
            self._release(slot)
            return
        entry.dirty = False
        future = self.mover.submit_write(entry.page.index, self._store, entry, slot)
        with self._lock:
            self._writing[slot] = future
            self._page_writes[entry.page.index] = future

        def finished(f: cf.Future, slot=slot, page=entry.page.index) -> None:
            with self._lock:
                if self._page_writes.get(page) is f:
                    del self._page_writes[page]
                self._writing.pop(slot, None)
                self._free.append(slot)

        future.add_done_callback(finished)

    def _store(self, entry: PageEntry, slot: int) -> None:
        """Writes a page to its place in the state file (in a mover thread). The checksum is recorded
        here, before the write's future completes, so that a read of the same page queued behind it
        (Note [same-page ordering] in stated.paging.transfers) always sees it."""
        entry.checksum = self.file.write(self.file_pages[entry.page.index], self.pool.buffer(slot))
        self.metrics.transfer_bytes.labels("host_to_disk").inc(self.file.page_bytes)
        self.bytes_written += self.file.page_bytes

    def _release(self, slot: int) -> None:
        with self._lock:
            self._free.append(slot)

    def _take_slot(self, block: bool) -> int | None:
        while True:
            with self._lock:  # free slots and pending writes read together: a landing write moves one to the other
                if self._free:
                    return self._free.pop()
                pending = list(self._writing.values())
            slot = self.pool.acquire()
            if slot is not None:
                return slot
            if not block:
                return None
            if pending:
                cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            elif self._reading:
                # Every spare slot holds a read ahead: give up the one needed last.
                self._drop_read(next(reversed(self._reading)))
            else:
                raise RuntimeError(f"job {self.session.job}: all {self.pool.capacity} page slots are in use and "
                                   f"none is being written back or read ahead")

    def _drop_read(self, page: int) -> None:
        slot, _future = self._reading.pop(page)
        try:
            self.mover.wait(page)
        except Exception:  # the data is not used; a real problem shows again when the page is read for use
            pass
        self._release(slot)
