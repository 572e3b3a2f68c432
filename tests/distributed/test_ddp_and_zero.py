"""DDP and ZeRO-1 (torch's ZeroRedundancyOptimizer) with stated optimizers, torchrun with two ranks on
gloo and the real daemon: the ranks stay identical and equal to torch.optim's run of the same model;
with ZeRO each rank's stated optimizer holds only its part of the parameters (and so of the state)."""

from __future__ import annotations

import json
import os
import subprocess

from test_one_job_per_run import env_for, free_port, torchrun

WORKER = os.path.join(os.path.dirname(__file__), "ddp_worker.py")


def run_case(daemon, tmp_path, case: str) -> list[dict]:
    command = torchrun("--master-addr", "127.0.0.1", "--master-port", str(free_port()), WORKER, str(tmp_path), case)
    done = subprocess.run(command, env=env_for(daemon), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]


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
