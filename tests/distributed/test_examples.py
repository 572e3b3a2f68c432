"""The README's launch commands for examples/train_distributed.py, run as written (on this test's daemon,
two ranks on gloo): torchrun's static rendezvous, the elastic rendezvous with a run id that the SLURM
sketch uses, and torch.multiprocessing. Each run trains (the loss falls) as one job."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from launch import ROOT, env_for, free_port, torchrun

EXAMPLE = os.path.join(ROOT, "examples", "train_distributed.py")


def run_example(daemon, *command: str) -> str:
    done = subprocess.run(list(command), env=env_for(daemon), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    losses = [float(v) for v in re.findall(r"^step +\d+ +loss (\S+)$", done.stdout, re.M)]
    assert len(losses) == 20 and losses[-1] < 0.7 * losses[0], done.stdout
    return done.stdout


@pytest.mark.parametrize("layout", ["fsdp2", "zero1"])
def test_torchrun_static_rendezvous(daemon, layout):
    out = run_example(daemon, *torchrun("--master-addr", "127.0.0.1", "--master-port", str(free_port()), EXAMPLE,
                                        "--layout", layout))
    assert re.search(rf"^job train_distributed\.py-127\.0\.0\.1-\d+: 2 ranks, {layout}$", out, re.M), out


def test_torchrun_elastic_rendezvous_with_a_run_id_as_under_slurm(daemon):
    out = run_example(daemon, *torchrun("--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
                                        "--rdzv-id", "4242", EXAMPLE, "--layout", "fsdp2"))
    assert re.search(r"^job 4242: 2 ranks, fsdp2$", out, re.M), out


def test_torch_multiprocessing_spawn(daemon):
    out = run_example(daemon, sys.executable, EXAMPLE, "--spawn", "2", "--layout", "ddp")
    assert re.search(r"^job train_distributed\.py-127\.0\.0\.1-\d+: 2 ranks, ddp$", out, re.M), out
