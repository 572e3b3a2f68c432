"""share_budget and HostBudget: max-min fair page capacities (Note [max-min budget sharing])."""

from __future__ import annotations

import random

import pytest

from stated.paging.budget import Change, Demand, HostBudget, share_budget

MiB = 2**20
PAGE = 4 * MiB


def progressive_filling(budget, demands):
    """The textbook definition, one page at a time: the short job holding the fewest bytes gets the
    next page (ties in map order) while one fits. Slow, obviously fair: the reference."""
    pages = {j: 0 for j in demands}
    remaining = budget
    while True:
        short = [j for j, d in demands.items() if pages[j] < d.pages and d.page_bytes <= remaining]
        if not short:
            return pages
        job = min(short, key=lambda j: pages[j] * demands[j].page_bytes)
        pages[job] += 1
        remaining -= demands[job].page_bytes


def test_one_job_gets_the_budget_or_its_need():
    assert share_budget(10 * PAGE, {"a": Demand(100 * PAGE, PAGE)}) == {"a": 10}
    assert share_budget(10 * PAGE, {"a": Demand(3 * PAGE, PAGE)}) == {"a": 3}
    # A partial last page still needs a whole slot; a budget short of a page rounds down.
    assert share_budget(10 * PAGE, {"a": Demand(3 * PAGE + 1, PAGE)}) == {"a": 4}
    assert share_budget(PAGE - 1, {"a": Demand(3 * PAGE, PAGE)}) == {"a": 0}
    assert share_budget(10 * PAGE, {"a": Demand(0, PAGE)}) == {"a": 0}


def test_two_equal_jobs_split_evenly():
    demands = {"a": Demand(100 * PAGE, PAGE), "b": Demand(100 * PAGE, PAGE)}
    assert share_budget(20 * PAGE, demands) == {"a": 10, "b": 10}
    # An odd page goes to the first job in map order.
    assert share_budget(21 * PAGE, demands) == {"a": 11, "b": 10}


def test_small_job_keeps_all_its_pages_beside_a_huge_one():
    demands = {"huge": Demand(10_000 * PAGE, PAGE), "small": Demand(7 * PAGE, PAGE)}
    assert share_budget(64 * PAGE, demands) == {"huge": 57, "small": 7}


def test_three_jobs_water_filling():
    demands = {
        "a": Demand(2 * PAGE, PAGE),  # fits below the share of 10
        "b": Demand(13 * PAGE, PAGE),  # above the share of 10, below the second level of 14
        "c": Demand(500 * PAGE, PAGE),
    }
    # 30 pages: a takes 2; 28 left for b and c at 14 each; b needs 13, so c gets 15.
    assert share_budget(30 * PAGE, demands) == {"a": 2, "b": 13, "c": 15}
    assert share_budget(12 * PAGE, demands) == {"a": 2, "b": 5, "c": 5}


def test_different_page_sizes_share_bytes_not_pages():
    demands = {"big_pages": Demand(64 * MiB * 100, 64 * MiB), "small_pages": Demand(MiB * 1000, MiB)}
    pages = share_budget(512 * MiB, demands)
    assert pages == {"big_pages": 4, "small_pages": 256}
    assert 4 * 64 * MiB + 256 * MiB == 512 * MiB


def test_matches_progressive_filling_and_guarantees_the_share():
    rng = random.Random(3)
    for _ in range(300):
        n = rng.randint(1, 5)
        same_page = rng.random() < 0.5
        demands = {
            f"job{i}": Demand(rng.randint(0, 40) * 4096 + rng.randint(0, 1), 4096 if same_page else rng.choice([4096, 8192, 65536]))
            for i in range(n)
        }
        budget = rng.randint(0, 200) * 4096 + rng.randint(0, 4095)
        pages = share_budget(budget, demands)
        assert sum(pages[j] * d.page_bytes for j, d in demands.items()) <= budget
        for j, d in demands.items():
            assert 0 <= pages[j] <= d.pages
            # The guarantee: nobody is pushed below its equal share.
            assert pages[j] >= min(d.pages, (budget // n) // d.page_bytes), (budget, demands, pages)
        leftover = budget - sum(pages[j] * d.page_bytes for j, d in demands.items())
        for j, d in demands.items():
            if pages[j] < d.pages:
                assert d.page_bytes > leftover, "a short job could have had another page"
        if same_page:
            # With one page size the allocation is exactly the textbook one.
            assert pages == progressive_filling(budget, demands), (budget, demands)


def test_host_budget_reports_changes_shrinks_first():
    budget = HostBudget(20 * PAGE)
    assert budget.set_job("a", 100 * PAGE, PAGE) == [Change("a", 0, 20)]
    changes = budget.set_job("b", 100 * PAGE, PAGE)
    assert changes == [Change("a", 20, 10), Change("b", 0, 10)]
    assert budget.capacities() == {"a": 10, "b": 10}
    assert budget.used_bytes() == 20 * PAGE
    # A third, small job takes 2 pages; the two large ones shrink to 9 each.
    changes = budget.set_job("c", 2 * PAGE, PAGE)
    assert changes == [Change("a", 10, 9), Change("b", 10, 9), Change("c", 0, 2)]


def test_job_leaving_gives_its_share_back():
    budget = HostBudget(30 * PAGE)
    budget.set_job("a", 100 * PAGE, PAGE)
    budget.set_job("b", 100 * PAGE, PAGE)
    budget.set_job("c", 100 * PAGE, PAGE)
    assert budget.capacities() == {"a": 10, "b": 10, "c": 10}
    assert budget.remove_job("b") == [Change("a", 10, 15), Change("c", 10, 15)]
    assert "b" not in budget and "a" in budget
    with pytest.raises(KeyError):
        budget.capacity("b")
    assert budget.remove_job("c") == [Change("a", 15, 30)]
    assert budget.capacity("a") == 30


def test_a_job_growing_and_the_budget_changing():
    budget = HostBudget(20 * PAGE)
    budget.set_job("small", 4 * PAGE, PAGE)
    budget.set_job("large", 100 * PAGE, PAGE)
    assert budget.capacities() == {"small": 4, "large": 16}
    # The small job registers more tensors and now needs more than its share.
    assert budget.set_job("small", 50 * PAGE, PAGE) == [Change("large", 16, 10), Change("small", 4, 10)]
    assert budget.resize(10 * PAGE) == [Change("small", 10, 5), Change("large", 10, 5)]
    assert budget.set_job("large", 100 * PAGE, PAGE) == []  # nothing moved


@pytest.mark.parametrize(
    "make",
    [
        lambda: Demand(-1, 4096),
        lambda: Demand(10, 0),
        lambda: Demand(10, 1.5),
        lambda: share_budget(-1, {}),
        lambda: HostBudget(-5),
        lambda: HostBudget(10).resize(-1),
    ],
)
def test_bad_values_are_refused(make):
    with pytest.raises(ValueError, match="invalid"):
        make()
