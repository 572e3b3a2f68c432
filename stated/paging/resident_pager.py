"""The pager without a host budget: every page lives in host memory (stated.paging.pager for the calls).

A page gets its slot and fresh state at its first `get`; nothing ever moves, so `get` never waits. With
--host-memory the daemon uses `DiskPager` instead, behind the same interface.
"""

from __future__ import annotations

import torch

from stated.paging.host_pool import HostPool
from stated.paging.page_table import PageEntry, Tier
from stated.paging.pager import Pager


class ResidentPager(Pager):
    """Every page of the session lives in host memory for the session's lifetime."""

    def __init__(self, session):
        self.session = session
        self.pool = HostPool(session.page_bytes, capacity=1 << 62)
        self.faults = 0
        self.bytes_read = 0
        self.bytes_written = 0

    def begin_pass(self, order: list[int]) -> None:
        pass

    def get(self, page: int) -> tuple[torch.Tensor, float]:
        entry = self.session.table[page]
        if entry.tier == Tier.NONE:
            self._materialise(entry)
        return self.pool.buffer(entry.slot), 0.0

    def done(self, page: int, dirty: bool = True) -> None:
        if dirty:
            self.session.table[page].dirty = True

    def end_pass(self) -> float:
        return 0.0

    def reset(self, page: int) -> None:
        """Gives the page fresh (zero) state, as before its first step."""
        entry = self.session.table[page]
        if entry.tier == Tier.NONE:
            return
        self._initialise(entry)

    def _materialise(self, entry: PageEntry) -> None:
        slot = self.pool.acquire()
        if slot is None:  # cannot happen with an unbounded pool
            raise MemoryError("host pool exhausted")
        entry.slot, entry.tier = slot, Tier.HOST
        self._initialise(entry)

    def _initialise(self, entry: PageEntry) -> None:
        binding = self.session.bind(entry, self.pool.buffer(entry.slot))
        self.session.init_page(binding, entry.page.index)
        entry.dirty = True

    @property
    def resident_bytes(self) -> int:
        return sum(e.page.nbytes for e in self.session.table if e.tier == Tier.HOST)

    @property
    def resident_pages(self) -> int:
        return len(self.session.table)
