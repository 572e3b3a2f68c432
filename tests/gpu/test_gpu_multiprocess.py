"""Two trainer processes on one GPU attached to one daemon: each shares its own buffers over CUDA IPC,
the daemon opens both and steps them concurrently on its own streams, and each process's run follows
torch.optim.AdamW(fused=True) in that process. A process that exits detaches, and the daemon closes
its IPC mappings without disturbing the other.

Tolerance: each trajectory feeds its parameters back into its gradients, so the ulp-level differences
between the kernels (Note [GPU tolerances] in test_gpu_parity.py) grow a little over 60 steps of a
transformer block: the largest difference of any weight stays below 1e-4.
"""

from __future__ import annotations

from cuda_env import require_cuda

require_cuda()

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402

from gpu_helpers import unique  # noqa: E402

pytestmark = pytest.mark.gpu

WORKER = os.path.join(os.path.dirname(__file__), "gpu_worker.py")


class Worker:
    def __init__(self, daemon, job: str, rank: int, seed: int):
        self.stderr = tempfile.TemporaryFile("w+")
        env = dict(os.environ, STATED_EMBEDDED="0")
        self.process = subprocess.Popen(
            [sys.executable, WORKER, "--address", daemon.address, "--job", job, "--rank", str(rank),
             "--seed", str(seed)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
            env=env)

    def expect(self, event: str) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait(timeout=60)
            self.stderr.seek(0)
            raise AssertionError(f"worker exited with {self.process.returncode} before {event!r}:\n"
                                 f"{self.stderr.read()}")
        message = json.loads(line)
        assert message["event"] == event, message
        return message

    def go(self) -> None:
        self.process.stdin.write("go\n")
        self.process.stdin.flush()

    def finish(self) -> int:
        self.process.stdin.close()
        return self.process.wait(timeout=120)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def test_two_processes_on_one_gpu_step_concurrently(gpu_daemon):
    job = unique("two-procs")
    workers = [Worker(gpu_daemon, job, rank, seed=rank + 1) for rank in (0, 1)]
    try:
        attached = [w.expect("attached") for w in workers]
        assert attached[0]["session"] != attached[1]["session"]
        for w in workers:  # both start at once: their steps overlap in the daemon
            w.go()
        results = [w.expect("done") for w in workers]
        assert [w.finish() for w in workers] == [0, 0]
    finally:
        for w in workers:
            w.kill()
    for result in results:
        assert result["step_count"] == result["steps"]
        assert result["max_abs_diff"] < 1e-4, result
        assert result["loss"] < 0.8 * result["first_loss"], result
    assert results[0]["loss"] != results[1]["loss"]  # different seeds, different runs
    channel, stub = gpu_daemon.stub()
    live = {s.id for s in stub.GetStats(gpu_daemon.everything()).sessions}
    channel.close()
    assert not live & {a["session"] for a in attached}
