"""Launching the distributed tests' workers: torchrun on loopback, an environment that reaches the test's
daemon and nothing of the launcher that runs the suite."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(daemon, **extra) -> dict[str, str]:
    """This environment without launcher variables (torchrun's, SLURM's, a job name), with the daemon's
    address and the checkout on the path."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TORCHELASTIC_", "SLURM_", "MASTER_", "STATED_JOB")) and k not in ("RANK", "WORLD_SIZE")}
    env.update(STATED_ADDRESS=daemon.address, STATED_EMBEDDED="0", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "client"), os.path.join(ROOT, "kernels")]))
    env.update(extra)
    return env


def torchrun(*args: str, ranks: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), *args]


def launch(daemon, out, worker: str, *args: str, ranks: int = 2, **env: str) -> None:
    """`worker` under torchrun with `ranks` ranks, static rendezvous on loopback, writing under `out`;
    `env`: more of the workers' environment."""
    command = torchrun("--master-addr", "127.0.0.1", "--master-port", str(free_port()), os.path.join(HERE, worker),
                       str(out), *args, ranks=ranks)
    done = subprocess.run(command, env=env_for(daemon, **env), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def run_ranks(daemon, out, worker: str, *args: str, **env: str) -> list[dict]:
    """`worker` on two ranks; each rank's OUT/rank<R>.json."""
    launch(daemon, out, worker, *args, **env)
    return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(2)]
