"""ResidencyPolicy: exact eviction sequences, the fault count of cyclic scans, and prefetch plans."""

from __future__ import annotations

import itertools
import random

import pytest

from stated.paging.residency import Decision, ResidencyPolicy


def run_step(policy, order):
    """One pass over `order`: (page, hit, evicted) per access."""
    out = []
    for page in order:
        d = policy.access(page)
        assert d.page == page
        out.append((page, d.hit, d.evict))
    return out


def faults_per_step(n, h, steps):
    policy = ResidencyPolicy(h)
    counts = []
    for _ in range(steps):
        before = policy.faults
        run_step(policy, range(n))
        counts.append(policy.faults - before)
    return counts


F, H_ = False, True  # fault, hit


def test_exact_sequence_five_pages_room_for_three():
    # Worked by hand from the rule "on a fault with no room, evict the most recently used page".
    policy = ResidencyPolicy(3)
    expected_steps = [
        [(0, F, None), (1, F, None), (2, F, None), (3, F, 2), (4, F, 3)],
        [(0, H_, None), (1, H_, None), (2, F, 1), (3, F, 2), (4, H_, None)],
        [(0, H_, None), (1, F, 0), (2, F, 1), (3, H_, None), (4, H_, None)],
        [(0, F, 4), (1, F, 0), (2, H_, None), (3, H_, None), (4, F, 3)],
        [(0, F, 4), (1, H_, None), (2, H_, None), (3, F, 2), (4, F, 3)],
    ]
    resident_after = [[0, 1, 4], [0, 3, 4], [2, 3, 4], [1, 2, 4], [0, 1, 4]]
    for expected, resident in zip(expected_steps, resident_after):
        assert run_step(policy, range(5)) == expected
        assert policy.resident() == resident  # least recently used first
    # The fifth step ends where the first did: the pattern repeats every N - 1 = 4 steps.
    assert sorted(policy.resident()) == [0, 1, 4]
    assert (policy.hits, policy.faults, policy.evictions) == (10, 15, 12)


def test_lru_would_fault_everywhere_this_does_not():
    # Documents why the policy exists: the second step of N=5, H=3 faults twice, not five times.
    assert faults_per_step(5, 3, 2) == [5, 2]


@pytest.mark.parametrize("n", [2, 3, 5, 8, 13, 31])
def test_steady_state_faults_are_n_minus_h(n):
    for h in range(1, n):
        counts = faults_per_step(n, h, 2 * n + 2)
        assert counts[0] == n, (n, h)  # cold start
        for c in counts[1:]:
            assert n - h <= c <= n - h + 1, (n, h, counts)
        # Over one period of N - 1 steps the total is exactly N (N - H): the average N(N-H)/(N-1).
        assert sum(counts[1:n]) == n * (n - h), (n, h, counts)


@pytest.mark.parametrize("n,h", [(1, 1), (4, 4), (4, 5), (7, 100)])
def test_room_for_everything_faults_only_on_the_first_step(n, h):
    policy = ResidencyPolicy(h)
    first = run_step(policy, range(n))
    assert first == [(p, False, None) for p in range(n)]
    for _ in range(3):
        assert run_step(policy, range(n)) == [(p, True, None) for p in range(n)]
    assert policy.evictions == 0


def test_capacity_zero_admits_nothing():
    policy = ResidencyPolicy(0)
    for _ in range(3):
        for page in range(4):
            assert policy.access(page) == Decision(page, hit=False, evict=None, admitted=False)
    assert policy.resident() == [] and len(policy) == 0
    assert policy.plan(range(4)) == [0, 1, 2, 3]
    assert policy.plan(range(4), limit=2) == [0, 1]


def test_capacity_one_evicts_the_previous_page():
    policy = ResidencyPolicy(1)
    assert run_step(policy, range(3)) == [(0, F, None), (1, F, 0), (2, F, 1)]
    assert run_step(policy, range(3)) == [(0, F, 2), (1, F, 0), (2, F, 1)]
    assert policy.resident() == [2]


def belady_evictions(trace, capacity):
    """Optimal offline replacement: evict the resident page used farthest in the future (never used
    again counts as farthest); ties go to the most recently used page. Returns the eviction list."""
    resident, last_use, evictions = set(), {}, []
    for i, page in enumerate(trace):
        if page not in resident:
            if len(resident) >= capacity:

                def next_use(p):
                    for j in range(i + 1, len(trace)):
                        if trace[j] == p:
                            return j
                    return len(trace)

                victim = max(resident, key=lambda p: (next_use(p), last_use[p]))
                resident.remove(victim)
                evictions.append(victim)
            resident.add(page)
        last_use[page] = i
    return evictions


@pytest.mark.parametrize("n,h", [(3, 1), (3, 2), (5, 3), (6, 2), (7, 6), (9, 4)])
def test_evictions_match_the_optimal_policy_on_cyclic_scans(n, h):
    trace = list(range(n)) * 5
    policy = ResidencyPolicy(h)
    ours = [d.evict for d in map(policy.access, trace) if d.evict is not None]
    assert ours == belady_evictions(trace, h)


def test_plan_agrees_with_access_on_random_orders():
    rng = random.Random(7)
    for _ in range(200):
        n = rng.randint(1, 12)
        policy = ResidencyPolicy(rng.randint(0, n + 1))
        trace = [rng.randrange(n) for _ in range(60)]
        for i, page in enumerate(trace):
            window = trace[i : i + rng.randint(0, 10)]
            limit = rng.choice([None, 1, 3])
            before = policy.resident()
            planned = policy.plan(iter(window), limit)
            assert policy.resident() == before, "plan must not change the policy"
            # Replay the window on a copy and collect the faults.
            copy = ResidencyPolicy(policy.capacity)
            for p in before:
                copy.access(p)
            actual = [p for p in window if copy.access(p).fault]
            assert planned == (actual if limit is None else actual[:limit])
            policy.access(page)


def test_plan_over_a_cyclic_window_names_the_next_faults():
    policy = ResidencyPolicy(3)
    order = list(range(5))
    run_step(policy, order)  # resident {0, 1, 4}; the next step faults on 2 and 3
    assert policy.plan(order) == [2, 3]
    assert policy.plan(order, limit=1) == [2]
    # Across the step boundary, from the cursor at page 3 of the second step:
    for page in order[:4]:
        policy.access(page)
    window = itertools.islice(itertools.cycle(order), 4, 4 + 6)  # 4, 0, 1, 2, 3, 4
    assert policy.plan(window) == [1, 2]
    assert policy.plan([]) == [] and policy.plan(order, limit=0) == []


def test_plan_consumes_only_what_it_needs():
    policy = ResidencyPolicy(2)
    # An endless scan: with a limit the plan stops after the limit-th fault.
    assert policy.plan(itertools.cycle(range(4)), limit=5) == [0, 1, 2, 3, 1]


def test_remove_frees_room_without_an_eviction():
    policy = ResidencyPolicy(2)
    policy.access("a")
    policy.access("b")
    assert policy.remove("a") is True
    assert policy.remove("a") is False
    assert policy.access("c") == Decision("c", hit=False, evict=None)
    assert policy.resident() == ["b", "c"]


def test_shrinking_evicts_most_recent_first_and_growing_refills():
    policy = ResidencyPolicy(4)
    for page in range(4):
        policy.access(page)
    policy.access(1)  # recency now 0, 2, 3, 1
    assert policy.resize(2) == [1, 3]
    assert policy.resident() == [0, 2]
    assert policy.access(3) == Decision(3, hit=False, evict=2)
    assert policy.resize(5) == []
    assert [policy.access(p).evict for p in (4, 5, 6)] == [None, None, None]
    assert policy.access(7).evict == 6
    assert policy.resize(0) == [7, 5, 4, 3, 0]
    assert policy.access(1).admitted is False


def test_resize_to_a_new_share_keeps_the_steady_state():
    # A budget reshare mid-run: after shrinking from 6 to 3 of 8 pages, steps fault 5 or 6 times.
    policy = ResidencyPolicy(6)
    for _ in range(3):
        run_step(policy, range(8))
    assert len(policy.resize(3)) == 3
    run_step(policy, range(8))
    for _ in range(8):
        before = policy.faults
        run_step(policy, range(8))
        assert 5 <= policy.faults - before <= 6


@pytest.mark.parametrize("bad", [-1, 1.5, "3", True, None])
def test_bad_capacity_is_refused(bad):
    with pytest.raises(ValueError, match="invalid capacity"):
        ResidencyPolicy(bad)
    with pytest.raises(ValueError, match="invalid capacity"):
        ResidencyPolicy(1).resize(bad)
