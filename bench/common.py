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

    def __init__(self, *extra: str):
        self.directory = tempfile.mkdtemp(prefix="stated-bench-")
        self.socket = os.path.join(self.directory, "stated.sock")
        self.log = open(os.path.join(self.directory, "daemon.log"), "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "stated", "serve", "--socket", self.socket, "--metrics-addr", "none",
             "--state-dir", os.path.join(self.directory, "state"), *extra],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not os.path.exists(self.socket):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(open(self.log.name).read())
            time.sleep(0.05)

    @property
    def address(self) -> str:
        return "unix://" + self.socket

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)
        self.log.close()


def interleaved(candidate, baseline, samples: int, warmup: int = 2) -> tuple[list[float], list[float]]:
    """Times candidate() and baseline() alternately; returns both lists of seconds."""
    for _ in range(warmup):
        candidate()
        baseline()
    a, b = [], []
    for _ in range(samples):
        t0 = time.perf_counter()
        candidate()
        a.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        baseline()
        b.append(time.perf_counter() - t0)
    return a, b


def ratios(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Median, min and max of the pairwise ratios a[i] / b[i]."""
    r = [x / y for x, y in zip(a, b)]
    return statistics.median(r), min(r), max(r)


def human(n: int) -> str:
    return f"{n / 1e6:g}M" if n < 1e9 else f"{n / 1e9:g}B"
