"""The distributed tests on a GPU machine: CUDA parameters, NCCL between the ranks, one GPU per rank (so
two GPUs at least: NCCL does not put two ranks on one device). The workers are the CPU tests' own
(STATED_TEST_DEVICE=cuda, tolerances in tests/distributed/placement.py); without two CUDA devices and
CuPy (the daemon's CUDA backend) these skip."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from launch import HERE, env_for, free_port, torchrun

pytestmark = pytest.mark.gpu


def require_two_gpus() -> None:
    cp = pytest.importorskip("cupy", reason="the daemon's CUDA backend needs CuPy (pip install 'stated[cuda]')")
    try:
        devices = cp.cuda.runtime.getDeviceCount()
    except Exception:  # noqa: BLE001 - no driver, no device: the same for these tests
        devices = 0
    if devices < 2:
        pytest.skip(f"NCCL needs a GPU per rank: two CUDA devices, and {devices} are here")


def run_on_gpus(daemon, out, worker: str, case: str) -> list[dict]:
    require_two_gpus()
    command = torchrun("--master-addr", "127.0.0.1", "--master-port", str(free_port()), os.path.join(HERE, worker),
                       str(out), case)
    done = subprocess.run(command, env=env_for(daemon, STATED_TEST_DEVICE="cuda"), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(2)]


@pytest.mark.parametrize("case", ["plain", "mp-policy", "clip", "scaler"])
def test_fsdp2_on_gpus_matches_torch_optim(daemon, tmp_path, case):
    for r in run_on_gpus(daemon, tmp_path, "fsdp2_worker.py", case):
        assert all(d["within"] for d in r["diffs"]), r["diffs"]
        if case == "clip":
            for ours, torch_norm in r["norms"]:
                assert ours == pytest.approx(torch_norm, rel=1e-5)


def test_fsdp2_on_gpus_bf16_master_weights_are_the_recipe(daemon, tmp_path):
    for r in run_on_gpus(daemon, tmp_path, "fsdp2_worker.py", "bf16-master"):
        assert all(d["within"] for d in r["diffs"]), r["diffs"]


@pytest.mark.parametrize("case", ["ddp", "zero", "fsdp1"])
def test_data_parallel_on_gpus_stays_identical_and_matches_torch(daemon, tmp_path, case):
    for r in run_on_gpus(daemon, tmp_path, "ddp_worker.py", case):
        assert all(r["within"]) and r["identical"], r
