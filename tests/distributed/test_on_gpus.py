"""The distributed tests on a GPU machine: CUDA parameters, NCCL between the ranks, one GPU per rank (so
two GPUs at least: NCCL does not put two ranks on one device). The workers are the CPU tests' own
(STATED_TEST_DEVICE=cuda, tolerances in tests/distributed/placement.py); without two CUDA devices and
CuPy (the daemon's CUDA backend) these skip."""

from __future__ import annotations

import pytest

from gpu.cuda_env import require_cuda
from launch import run_ranks

pytestmark = pytest.mark.gpu
require_cuda(2, "NCCL needs a GPU per rank: ")


def run_on_gpus(daemon, out, worker: str, case: str) -> list[dict]:
    return run_ranks(daemon, out, worker, case, STATED_TEST_DEVICE="cuda")


@pytest.mark.parametrize("case", ["plain", "mp-policy", "clip", "scaler"])
def test_fsdp2_on_gpus_matches_torch_optim(daemon, tmp_path, case):
    for r in run_on_gpus(daemon, tmp_path, "fsdp2_worker.py", case):
        assert all(d["within"] for d in r["diffs"]), r["diffs"]
        if case == "clip":
            for ours, torch_norm in r["norms"]:
                assert ours == pytest.approx(torch_norm, rel=1e-5)


@pytest.mark.parametrize("case", ["ddp", "zero", "fsdp1"])
def test_data_parallel_on_gpus_stays_identical_and_matches_torch(daemon, tmp_path, case):
    for r in run_on_gpus(daemon, tmp_path, "ddp_worker.py", case):
        assert all(r["within"]) and r["identical"], r
