"""The page table: metadata for every page of a session, never buffers (STYLE.md, the vLLM anchor).

An entry says which tier the page is in, which slot of that tier's pool holds it, whether it is dirty
(changed since it was last written to disk) and the checksum of its last written copy. The pools hold
the bytes; the pager moves them and keeps the table.
"""

from __future__ import annotations

import dataclasses
import enum

from stated.layout import Page


class Tier(enum.IntEnum):
    """The pager's tiers. A page in the GPU cache keeps its entry here: that cache sits above the host
    tier, and its backend records which pages it holds (Note [GPU cache residency] in
    stated.backends.cuda_pages)."""

    NONE = 0  # never touched: its state is all zeros, nothing stored anywhere yet
    HOST = 1
    DISK = 2


@dataclasses.dataclass
class PageEntry:
    page: Page
    tier: Tier = Tier.NONE
    slot: int | None = None
    dirty: bool = False
    # Checksum of the copy on disk; None while the page has never been written there.
    checksum: int | None = None


class PageTable:
    def __init__(self) -> None:
        self.entries: list[PageEntry] = []

    def extend(self, pages: list[Page]) -> None:
        for page in pages:
            if page.index != len(self.entries):
                raise ValueError(f"page {page.index} added out of order (expected {len(self.entries)})")
            self.entries.append(PageEntry(page))

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> PageEntry:
        return self.entries[index]

    def __iter__(self):
        return iter(self.entries)

    def state_bytes(self) -> int:
        return sum(e.page.nbytes for e in self.entries)
