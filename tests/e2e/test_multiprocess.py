"""Several trainer processes on one daemon: 2 jobs x 2 ranks stepping at once, each matching
torch.optim.AdamW(fused=True) exactly (the daemon runs torch's fused CPU kernel); token isolation
between processes; and a client killed with SIGKILL while the others train.

Every process here is real: `stated serve` and the trainers (tests/support/worker.py) are separate
processes that meet only through the unix socket and shared memory.
"""

from __future__ import annotations

import copy
import json
import math
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import pytest
import torch

import stated
from stated.v1 import state_service_pb2 as pb

WORKER = os.path.join(os.path.dirname(os.path.dirname(__file__)), "support", "worker.py")
STEPS = 240
DETACH_DEADLINE = 10.0


def unique(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:6]}"


class Worker:
    """A trainer subprocess; its stdout JSON lines arrive on a queue (so reads can time out)."""

    def __init__(self, daemon, *args: str):
        env = dict(os.environ, STATED_EMBEDDED="0", OMP_NUM_THREADS="1")
        self.stderr = tempfile.TemporaryFile("w+")  # a file, not a pipe nobody drains
        self.process = subprocess.Popen([sys.executable, WORKER, *args, "--address", daemon.address],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                        text=True, env=env)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    @classmethod
    def train(cls, daemon, job: str, rank: int, seed: int, *extra: str) -> "Worker":
        worker = cls(daemon, "train", "--job", job, "--rank", str(rank), "--seed", str(seed),
                     "--steps", str(STEPS), *extra)
        worker.job, worker.rank = job, rank
        return worker

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def expect(self, event: str, timeout: float = 60.0) -> dict:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"worker {self.process.pid} sent no {event!r} within {timeout} s") from None
        if line is None:
            self.process.wait()
            self.stderr.seek(0)
            raise AssertionError(f"worker {self.process.pid} exited with {self.process.returncode} before "
                                 f"{event!r}:\n{self.stderr.read()}")
        message = json.loads(line)
        assert message.get("event") == event, message
        return message

    def send(self, line: str = "go") -> None:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def finish(self, timeout: float = 60.0) -> int:
        self.process.stdin.close()
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.stderr.close()


@pytest.fixture
def stub(daemon):
    channel, stub = daemon.stub()
    yield stub
    channel.close()


@pytest.fixture
def workers():
    started: list[Worker] = []
    yield started
    for worker in started:
        worker.kill()


def sessions(stub, daemon) -> dict[str, pb.SessionStats]:
    return {s.id: s for s in stub.GetStats(daemon.everything()).sessions}


def assert_matches_torch(result: dict) -> None:
    assert result["steps"] == STEPS and result["step_count"] == STEPS
    assert result["max_abs_diff"] == 0.0, result
    assert result["max_state_diff"] == 0.0, result
    assert math.isfinite(result["loss"]) and result["loss"] < 0.5 * result["first_loss"], result


def detach_lines(log: str, session: str) -> list[str]:
    return re.findall(rf"detach job=\S+ rank=\d+ session={session} reason=([a-z ]+|its trainer \(pid \d+\) died) "
                      rf"steps=\d+", log)


def test_two_jobs_two_ranks_step_concurrently_and_match_torch(daemon, stub, workers):
    jobs = [unique("job-a"), unique("job-b")]
    workers += [Worker.train(daemon, job, rank, seed=10 * j + rank) for j, job in enumerate(jobs) for rank in (0, 1)]
    attached = [w.expect("attached") for w in workers]

    # All four are attached at once, each its own session with its own arenas.
    live = sessions(stub, daemon)
    for worker, info in zip(workers, attached):
        s = live[info["session"]]
        assert (s.job, s.rank, s.pid, s.tensors) == (worker.job, worker.rank, worker.process.pid, 4)
        assert len(info["segments"]) == 2 and all(n in daemon.segments() for n in info["segments"])
    assert len({info["session"] for info in attached}) == 4
    assert len({n for info in attached for n in info["segments"]}) == 8

    for worker in workers:
        worker.send("go")
    results = [w.expect("done") for w in workers]
    assert [w.finish() for w in workers] == [0, 0, 0, 0]

    for result in results:
        assert_matches_torch(result)
    assert len({r["loss"] for r in results}) == 4  # different seeds, different runs
    # Each process detached as it exited: one attach and one detach line per session, and no state left.
    log = daemon.log()
    for info in attached:
        assert len(re.findall(rf"attach job=\S+ rank=\d+ session={info['session']} ", log)) == 1
        assert detach_lines(log, info["session"]) == ["client"]
    assert not set(sessions(stub, daemon)) & {info["session"] for info in attached}
    assert daemon.segments() == []


def test_a_session_id_without_its_token_gets_permission_denied(daemon, stub, address):
    """The victim is this test's process, training beside torch; the intruder, another process, knows the
    victim's session id (as anyone who reads the daemon's log or GetStats could) but not its token."""
    job = unique("isolated")
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    reference = copy.deepcopy(model)
    opt = stated.AdamW(model.parameters(), lr=1e-2, address=address, job=job)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, fused=True)

    def train(steps: int) -> None:
        for _ in range(steps):
            x = torch.randn(16, 8)
            for m, o in ((model, opt), (reference, ref_opt)):
                o.zero_grad()
                m(x).square().mean().backward()
                o.step()

    try:
        train(20)
        before = [p.detach().clone() for p in model.parameters()]
        intruder = subprocess.run(
            [sys.executable, WORKER, "intrude", "--address", address, "--session", opt.session_id, "--job", job,
             "--rank", "0"], capture_output=True, text=True, timeout=60, env=dict(os.environ, STATED_EMBEDDED="0"))
        assert intruder.returncode == 0, intruder.stderr
        report = json.loads(intruder.stdout.splitlines()[-1])
        for rpc in ("Step", "Register", "ExportState", "ImportState", "Detach"):
            name, is_permission_error, message = report[rpc]
            assert name == "PermissionDeniedError" and is_permission_error, (rpc, report[rpc])
            assert "session.token" in message and opt.session_id in message
        assert report["Attach"][:2] == ["AlreadyAttachedError", True], report["Attach"]

        # Nothing of the victim changed, and the intruder holds no session of its own.
        assert all(torch.equal(p.detach(), q) for p, q in zip(model.parameters(), before))
        live = sessions(stub, daemon)
        assert list(live) == [opt.session_id]
        assert (live[opt.session_id].steps, live[opt.session_id].tensors) == (20, 4)
        train(20)  # its state was never touched: it still matches torch exactly
        for p, q in zip(model.parameters(), reference.parameters()):
            assert torch.equal(p.detach(), q.detach())
    finally:
        opt.close()
    assert sessions(stub, daemon) == {}
    assert daemon.segments() == []


def test_sigkill_of_one_client_while_others_train(daemon, stub, workers):
    jobs = [unique("job-a"), unique("job-b")]
    survivors = [Worker.train(daemon, jobs[0], 0, 21, "--pause-halfway"),
                 Worker.train(daemon, jobs[1], 0, 22, "--pause-halfway")]
    doomed = Worker.train(daemon, jobs[1], 1, 24, "--forever")
    workers += [*survivors, doomed]
    attached = {id(w): w.expect("attached") for w in workers}
    victim = attached[id(doomed)]
    assert len(victim["segments"]) == 2 and all(n in daemon.segments() for n in victim["segments"])

    for worker in workers:
        worker.send("go")
    for worker in survivors:
        worker.expect("halfway")
    doomed.expect("stepping")
    for worker in survivors:  # the others go on stepping while one of them dies
        worker.send("go on")
    os.kill(doomed.process.pid, signal.SIGKILL)
    killed = time.monotonic()
    doomed.process.wait()

    while victim["session"] in sessions(stub, daemon):
        assert time.monotonic() - killed < DETACH_DEADLINE, "the daemon did not notice the dead client"
        time.sleep(0.05)
    # The session leaves the table before its detach is logged: wait for the line.
    while not detach_lines(daemon.log(), victim["session"]) and time.monotonic() - killed < DETACH_DEADLINE:
        time.sleep(0.05)
    assert detach_lines(daemon.log(), victim["session"]) == [f"its trainer (pid {doomed.process.pid}) died"]
    # Its state stays retained for a restarted trainer (tests/e2e/test_durability.py); a drop frees it.
    jobs_held = {(j.job, j.rank): j.state for j in stub.GetStats(daemon.everything()).jobs}
    assert jobs_held[(jobs[1], 1)] == "retained"
    dropped = stub.Drop(pb.DropRequest(job=jobs[1], rank=1, admin_token=daemon.admin_token())).dropped
    assert [(j.job, j.rank, j.state) for j in dropped] == [(jobs[1], 1, "retained")]
    assert not set(victim["segments"]) & set(daemon.segments()), "the dropped arenas remain"

    results = [w.expect("done") for w in survivors]
    assert [w.finish() for w in survivors] == [0, 0]
    for result in results:
        assert_matches_torch(result)
    for worker in survivors:
        assert detach_lines(daemon.log(), attached[id(worker)]["session"]) == ["client"]
    assert sessions(stub, daemon) == {}
    assert daemon.segments() == []
