"""Which pages of a session stay resident in a tier, and which one leaves when another must come in.

A pure object (STYLE.md, the vLLM anchor): page ids and a capacity in, hit/fault decisions, evictions
and prefetch plans out. It holds no buffers and does no I/O; its user (the disk pager for the host
tier, the CUDA backend for the GPU cache) owns the slots and the moves, and asks this object what to
do. Page ids are any hashable values (both use page numbers).

Note [cyclic scan eviction]
---------------------------
Every step visits every page in the same order (DESIGN.md, "Pages, tiers, eviction, prefetch"). Under
such a cyclic scan LRU is pessimal: the least recently used page is exactly the one needed next, so
with room for H < N pages LRU faults on all N pages every step. This policy evicts the *most* recently
used page instead. In a cyclic scan the page just used is the resident page whose next use is farthest
away, so MRU makes the same choice as Belady's optimal (clairvoyant) policy and faults the minimum
number of times: with N pages and room for H (1 <= H < N) a steady-state step faults N - H or N - H + 1
times (on average N(N - H)/(N - 1)); the first step faults N times (the cold start); with H >= N no step
after the first faults. The resident set is "fixed" in the sense that matters: the pages that hit in
one step are mostly the pages that hit in the next, and only the faulting pages move; the set drifts
backwards by about one page per step because the page before the first fault is evicted when that
fault needs room. Tests compare the eviction sequence with a Belady oracle.

The order does not have to be cyclic for the policy to be correct (every decision is still valid);
it is only optimal for cyclic scans, which is what the engine's passes produce.

Note [capacity and staging]
---------------------------
`capacity` counts resident pages only. A read that a prefetcher starts early needs a buffer of its
own while the page it will replace is still in use (on a fault the victim is the page the kernel
has just finished, Note [cyclic scan eviction]), so a pager with S slots and D reads in flight gives
this policy capacity S - D and uses the rest as staging buffers: the fault's staging buffer becomes
the page's resident slot, and the victim's slot becomes a staging buffer once it is written back.

Capacity 0 is allowed (a budget too small for a job): every access faults and nothing is admitted,
so the pager must hold the page in a staging buffer and write it back at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Iterable

Page = Hashable


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    """What `access(page)` found and what the policy's user must do about it."""

    page: Page
    hit: bool  # resident already: nothing to read
    evict: Page | None = None  # must leave (be written back if dirty) to make room for `page`
    admitted: bool = True  # False only at capacity 0: the page stays resident for this use only

    @property
    def fault(self) -> bool:
        return not self.hit


class ResidencyPolicy:
    """Most-recently-used eviction over a fixed capacity of pages (Note [cyclic scan eviction]).

    The resident pages are kept in a dict in order of last use (least recent first), which makes every
    operation O(1): a hit moves the page to the end, a fault evicts the last entry.
    """

    def __init__(self, capacity: int):
        self._check_capacity(capacity)
        self._capacity = capacity
        # Insertion order is recency order: the last key is the most recently used page.
        self._pages: dict[Page, None] = {}
        self.hits = 0
        self.faults = 0
        self.evictions = 0

    @property
    def capacity(self) -> int:
        return self._capacity

    def __len__(self) -> int:
        return len(self._pages)

    def __contains__(self, page: Page) -> bool:
        return page in self._pages

    def resident(self) -> list[Page]:
        """The resident pages, least recently used first."""
        return list(self._pages)

    def access(self, page: Page) -> Decision:
        """Records a use of `page` and says whether it was resident and what leaves to make room."""
        if page in self._pages:
            del self._pages[page]
            self._pages[page] = None
            self.hits += 1
            return Decision(page, hit=True)
        self.faults += 1
        if self._capacity == 0:
            return Decision(page, hit=False, admitted=False)
        victim = None
        if len(self._pages) >= self._capacity:
            victim = self._pop_most_recent()
        self._pages[page] = None
        return Decision(page, hit=False, evict=victim)

    def plan(self, upcoming: Iterable[Page], limit: int | None = None) -> list[Page]:
        """The pages among `upcoming` that will fault, in order, if they are accessed in that order.

        Each of them needs a read before its turn, so a prefetcher can start those reads now. Nothing
        changes here: as long as no `remove` or `resize` comes in between, accessing `upcoming` in
        order faults on exactly these pages (a page evicted and needed again appears again). At most
        `limit` pages are returned, and `upcoming` is consumed only as far as needed, so it may be a
        lazy window over the scan order, e.g. `itertools.islice(itertools.cycle(order), i + 1, i + 65)`.
        """
        if limit is not None and limit <= 0:
            return []
        faults: list[Page] = []
        if self._capacity == 0:
            for page in upcoming:
                faults.append(page)
                if limit is not None and len(faults) >= limit:
                    break
            return faults
        # Simulate on an overlay of the real set: pages evicted and admitted since now.
        evicted: set[Page] = set()
        admitted: set[Page] = set()
        count = len(self._pages)
        mru = next(reversed(self._pages)) if self._pages else None
        for page in upcoming:
            if page in admitted or (page in self._pages and page not in evicted):
                mru = page
                continue
            if count >= self._capacity:
                # The victim is the most recently used page, which is the page accessed last (or,
                # before the first simulated access, the real one).
                if mru in admitted:
                    admitted.discard(mru)
                else:
                    evicted.add(mru)
                count -= 1
            admitted.add(page)
            count += 1
            mru = page
            faults.append(page)
            if limit is not None and len(faults) >= limit:
                break
        return faults

    def remove(self, page: Page) -> bool:
        """Forgets `page` (dropped by its job, or moved out by the policy's user); False if it was not resident."""
        if page in self._pages:
            del self._pages[page]
            return True
        return False

    def resize(self, capacity: int) -> list[Page]:
        """Changes the capacity (the host budget was reshared); returns the pages that must leave.

        Shrinking evicts most recently used pages first, the same choice `access` would make (Note
        [cyclic scan eviction]); growing evicts nothing, and the room fills as pages fault.
        """
        self._check_capacity(capacity)
        self._capacity = capacity
        victims = []
        while len(self._pages) > capacity:
            victims.append(self._pop_most_recent())
        return victims

    def _pop_most_recent(self) -> Page:
        page, _ = self._pages.popitem()  # dict.popitem removes the last inserted key: LIFO
        self.evictions += 1
        return page

    @staticmethod
    def _check_capacity(capacity: int) -> None:
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 0:
            raise ValueError(f"invalid capacity {capacity!r}: expected a whole number of pages >= 0")
