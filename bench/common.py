"""Shared by the benchmarks: a private daemon process, interleaved timing, and the summary line.

PERFORMANCE.md: the baseline is measured in the same run, interleaved with the candidate (A, B, A, B),
at least 5 samples each after a warm-up; each script prints the median ratio with min and max last.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time


class BenchDaemon:
    """`stated serve` in a temporary directory, as a separate process (as in production)."""

    def __init__(self, *extra: str, tree: str | None = None):
        """`tree`: run the daemon from another checkout of the repository (a baseline), not this one."""
        env = dict(os.environ)
        # `python -m` puts the working directory first on sys.path, so the baseline also runs in its tree.
        if tree is not None:
            tree = os.path.abspath(tree)
            env["PYTHONPATH"] = os.pathsep.join([tree, os.path.join(tree, "client"), os.path.join(tree, "kernels")])
        self.directory = tempfile.mkdtemp(prefix="stated-bench-")
        self.socket = os.path.join(self.directory, "stated.sock")
        self.log = open(os.path.join(self.directory, "daemon.log"), "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "stated", "serve", "--socket", self.socket, "--metrics-addr", "none",
             "--state-dir", os.path.join(self.directory, "state"), *extra],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=tree)
        deadline = time.monotonic() + 60
        while not os.path.exists(self.socket):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(open(self.log.name).read())
            time.sleep(0.05)

    @property
    def address(self) -> str:
        return "unix://" + self.socket

    def healthy(self) -> bool:
        """Whether the daemon answers the gRPC health check with SERVING."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(self.address) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            except grpc.RpcError:
                return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)
        self.log.close()

    def kill(self) -> None:
        """SIGKILL: the daemon gets no chance to write or remove anything."""
        self.process.kill()
        self.process.wait(timeout=60)
        self.log.close()


# A trainer process for TreeTrainer: builds cpu_step's parameters (this checkout's make_params, so both
# trees step the same ones), then steps its stated.AdamW on each "step" line and answers with the step's
# own time in seconds.
_TRAINER = r"""
import sys, time
sys.path.insert(0, sys.argv[5])
import stated
from cpu_step import make_params
n, per_tensor, address, job = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
opt = stated.AdamW(make_params(n, per_tensor), lr=1e-3, address=address, job=job)
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() != "step":
        break
    t0 = time.perf_counter()
    opt.step()
    print(time.perf_counter() - t0, flush=True)
opt.close()
"""


class TreeTrainer:
    """A trainer process whose stated client comes from `tree` (None: this checkout), stepping a
    stated.AdamW of `n` parameters on `address`. A client only speaks its own tree's protocol, so a
    baseline daemon gets a baseline trainer; step() returns the step's time as the trainer measured it
    (a number, which rotated() takes as the sample)."""

    def __init__(self, tree: str | None, n: int, per_tensor: int, address: str, job: str):
        root = os.path.abspath(tree) if tree is not None else os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.path.join(root, "client"),
                                                           os.path.join(root, "kernels")]))
        bench = os.path.dirname(os.path.abspath(__file__))
        self.process = subprocess.Popen([sys.executable, "-c", _TRAINER, str(n), str(per_tensor), address, job, bench],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=root)
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the trainer from {root} did not start (exit status {self.process.wait()})")

    def step(self) -> float:
        self.process.stdin.write("step\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        if not answer:
            raise RuntimeError(f"the trainer stopped (exit status {self.process.wait()})")
        return float(answer)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=120)


def interleaved(candidate, baseline, samples: int, warmup: int = 2) -> tuple[list[float], list[float]]:
    """Times candidate() and baseline() alternately; returns both lists of seconds."""
    a, b = rotated([candidate, baseline], samples, warmup)
    return a, b


def rotated(functions, samples: int, warmup: int = 2, progress=None, alternate: int = 0) -> list[list[float]]:
    """Times each function in turn (A, B, C, A, B, C, ...); returns one list of seconds per function.

    With `alternate=k`, the first k functions go in reverse order every other round (A, B, C, then B, A,
    C): two daemons compared with each other then take each slot equally often, since the slot alone
    made a difference (an A/A run of cpu_step.py gave 1.20 at 50M with a fixed order).

    A function that returns a number has timed itself (its untimed preparation, such as a step before a
    checkpoint, stays out of the sample): that number is its sample. `progress(done, total)` is called
    after each round, warm-up rounds included, for benchmarks whose rounds take seconds."""
    for round_ in range(warmup):
        for f in functions:
            f()
        if progress:
            progress(round_ + 1, warmup + samples)
    times: list[list[float]] = [[] for _ in functions]
    for round_ in range(samples):
        order = list(zip(functions, times))
        if alternate and round_ % 2:
            order[:alternate] = order[:alternate][::-1]
        for f, seconds in order:
            t0 = time.perf_counter()
            inner = f()
            seconds.append(inner if isinstance(inner, (int, float)) else time.perf_counter() - t0)
        if progress:
            progress(warmup + round_ + 1, warmup + samples)
    return times


def ratios(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Median, min and max of the pairwise ratios a[i] / b[i]."""
    r = [x / y for x, y in zip(a, b)]
    return statistics.median(r), min(r), max(r)


def human(n: int) -> str:
    return f"{n / 1e6:g}M" if n < 1e9 else f"{n / 1e9:g}B"
