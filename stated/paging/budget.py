"""How one host-memory budget is shared between the jobs of a daemon, in whole pages per job.

A pure object: the budget (bytes) and each job's state size and page size in, each job's page
capacity out. It allocates nothing; the daemon's Paging hands the capacities to the jobs' disk pagers,
which apply them to their residency policy (`ResidencyPolicy.resize`) and pool. Jobs are keyed by any hashable name.

Note [max-min budget sharing]
-----------------------------
The rule is max-min fairness by water-filling, measured in bytes of page slots:

1. A job needs `ceil(state_bytes / page_bytes)` pages; it never gets more.
2. The water level is the largest equal share such that the jobs that need less than it keep all
   of their need and the others get the level: jobs below it keep their need, the others get the
   level rounded down to whole pages.
3. Bytes left over by the rounding go, one page at a time, to jobs still short of their need, the job
   holding the fewest bytes first (ties in the order the jobs were given), while a page still fits.

With one page size for all jobs this is exactly progressive filling (hand out one page at a time
to the short job holding the least), which the tests use as the reference.

So a job whose state fits in its equal share (`budget // number of jobs`) keeps all its pages however
large the others are, and every job gets at least `min(need, (budget // jobs) // page_bytes)` pages:
one job's large state never pushes another's resident set below its share. What a small job does not
use is shared among the larger ones, so nothing is idle while a job is short. When a job leaves,
its share flows back to the others. Jobs that are short end up within about a page of each other.

An equal split rather than one weighted by state size: a weighted split lets the largest job take
most of the memory and turns every other job's steady state into faults, which is exactly what the
rule must prevent. A budget smaller than one page per job gives some jobs capacity 0; the residency
policy and the disk pager handle that (every access then faults), so the rule does not need a floor.

Note [apply shrinks first]
--------------------------
Every change returns the capacities that changed, shrinking jobs first: their pagers evict those pages
and frees their slots before growing jobs allocate, so the total held never exceeds the budget.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping

Job = Hashable


@dataclasses.dataclass(frozen=True, slots=True)
class Demand:
    """What a job asks of the budget: its state size and the size of one page slot, in bytes."""

    state_bytes: int
    page_bytes: int

    def __post_init__(self) -> None:
        if not isinstance(self.state_bytes, int) or self.state_bytes < 0:
            raise ValueError(f"invalid state_bytes {self.state_bytes!r}: expected a whole number >= 0")
        if not isinstance(self.page_bytes, int) or self.page_bytes <= 0:
            raise ValueError(f"invalid page_bytes {self.page_bytes!r}: expected a whole number > 0")

    @property
    def pages(self) -> int:
        return -(-self.state_bytes // self.page_bytes)

    @property
    def need_bytes(self) -> int:
        return self.pages * self.page_bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Change:
    """A job's page capacity moved from `old` to `new` (old is 0 for a job just added)."""

    job: Job
    old: int
    new: int


def share_budget(budget_bytes: int, demands: Mapping[Job, Demand]) -> dict[Job, int]:
    """Each job's page capacity under Note [max-min budget sharing]; ties go in the mapping's order."""
    if not isinstance(budget_bytes, int) or budget_bytes < 0:
        raise ValueError(f"invalid budget_bytes {budget_bytes!r}: expected a whole number >= 0")
    # The water level: jobs whose whole need fits below it keep all of it; the rest share equally.
    order = sorted(demands, key=lambda job: demands[job].need_bytes)  # stable: ties keep map order
    remaining, left = budget_bytes, len(order)
    pages: dict[Job, int] = {}
    for job in order:
        if demands[job].need_bytes * left > remaining:
            break
        pages[job] = demands[job].pages
        remaining -= demands[job].need_bytes
        left -= 1
    level = remaining // left if left else 0
    for job in order[len(pages) :]:
        pages[job] = level // demands[job].page_bytes
        remaining -= pages[job] * demands[job].page_bytes
    # Rounding to whole pages left bytes over: a page at a time to the short job holding the least.
    # Less than one page per short job is left with one page size, so this loop is short; with mixed
    # sizes it runs at most about (largest page / smallest page) times per job.
    jobs = list(demands)
    while True:
        short = [j for j in jobs if pages[j] < demands[j].pages and demands[j].page_bytes <= remaining]
        if not short:
            break
        job = min(short, key=lambda j: pages[j] * demands[j].page_bytes)
        pages[job] += 1
        remaining -= demands[job].page_bytes
    return {job: pages[job] for job in demands}


class HostBudget:
    """The budget of one tier (host memory) and the jobs that share it.

    Each call that changes the jobs or the budget recomputes every capacity and returns the changes,
    shrinks first (Note [apply shrinks first]).
    """

    def __init__(self, budget_bytes: int):
        share_budget(budget_bytes, {})  # validates
        self._budget = budget_bytes
        self._demands: dict[Job, Demand] = {}
        self._pages: dict[Job, int] = {}

    @property
    def budget_bytes(self) -> int:
        return self._budget

    def __contains__(self, job: Job) -> bool:
        return job in self._demands

    def capacity(self, job: Job) -> int:
        """The job's page capacity; KeyError for a job that is not sharing the budget."""
        return self._pages[job]

    def capacities(self) -> dict[Job, int]:
        return dict(self._pages)

    def used_bytes(self) -> int:
        """Bytes that the current capacities may hold at most (never more than the budget)."""
        return sum(self._pages[j] * d.page_bytes for j, d in self._demands.items())

    def set_job(self, job: Job, state_bytes: int, page_bytes: int) -> list[Change]:
        """Adds a job, or updates one whose state grew (it registered more tensors)."""
        self._demands[job] = Demand(state_bytes, page_bytes)
        return self._reshare()

    def remove_job(self, job: Job) -> list[Change]:
        """Removes a job (dropped, or detached for good); the others get its share back."""
        del self._demands[job]
        del self._pages[job]
        return self._reshare()

    def resize(self, budget_bytes: int) -> list[Change]:
        """Changes the budget itself (an operator's reconfiguration)."""
        share_budget(budget_bytes, {})
        self._budget = budget_bytes
        return self._reshare()

    def _reshare(self) -> list[Change]:
        new = share_budget(self._budget, self._demands)
        changes = [Change(j, self._pages.get(j, 0), n) for j, n in new.items() if self._pages.get(j) != n]
        self._pages = new
        return sorted(changes, key=lambda c: c.new >= c.old)  # shrinks first, stable otherwise
