"""DDP and ZeRO-1 (torch's ZeroRedundancyOptimizer) with stated optimizers, torchrun with two ranks on
gloo and the real daemon: the ranks stay identical and equal to torch.optim's run of the same model;
with ZeRO each rank's stated optimizer holds only its part of the parameters (and so of the state)."""

from __future__ import annotations


from launch import run_ranks


def run_case(daemon, tmp_path, case: str) -> list[dict]:
    return run_ranks(daemon, tmp_path, "ddp_worker.py", case)


def test_ddp_ranks_stay_identical_and_equal_to_torch(daemon, tmp_path):
    ranks = run_case(daemon, tmp_path, "ddp")
    for r in ranks:
        assert all(r["within"]) and r["identical"], r
        assert r["held"] == r["total"]  # each DDP rank keeps the whole state: one copy per rank
    assert ranks[0]["job"] == ranks[1]["job"]


def test_zero_gives_each_rank_its_part_and_matches_torch(daemon, tmp_path):
    ranks = run_case(daemon, tmp_path, "zero")
    for r in ranks:
        assert all(r["within"]) and r["identical"], r
        assert 0 < r["held"] < r["total"]
    assert ranks[0]["held"] + ranks[1]["held"] == ranks[0]["total"]
    assert ranks[0]["job"] == ranks[1]["job"]
