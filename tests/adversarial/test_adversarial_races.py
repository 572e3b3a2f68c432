"""Races around retained state: trainers resuming the same (job, rank) at once, many ranks resuming after a
daemon restart, a resume against `stated drop` and against retention running out, a trainer killed and
another started at once, a checkpoint against close. Whatever wins, the outcome is one of the promised
ones: the state resumed whole, or gone for good and started afresh; never half of each, never INTERNAL."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import stated
from adversarial_helpers import (HYPER, SMALL_PAGES, Bystander, assert_clean_log, assert_same, checkpoint_files,
                                 checkpointed_job, jobs, make_model, params_of, train, unique)
from e2e.test_durability import TRAINER
from stated.v1 import state_service_pb2 as pb


def at_once(*calls):
    """Runs the calls on threads released together; returns each one's result or exception, in order."""
    barrier = threading.Barrier(len(calls))
    results: list = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = calls[i]()
        except Exception as exc:  # noqa: BLE001
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def retained_job(proc, steps: int = 2, rank: int = 0, job: str | None = None):
    """A job trained `steps` steps, checkpointed, then closed with keep: (job, its parameters)."""
    opt, job, saved = checkpointed_job(proc, steps, rank, job)
    opt.close(keep=True)
    return job, saved


def resumer(proc, job: str, rank: int = 0):
    def resume():
        fresh = make_model(seed=50 + rank)
        opt = stated.AdamW(fresh.parameters(), address=proc.address, job=job, rank=rank, resume=True, **HYPER)
        return opt, params_of(fresh)
    return resume


def test_two_trainers_resuming_one_rank_at_once_one_wins_the_other_is_told(spawn):
    proc = spawn("daemon", *SMALL_PAGES)
    job, saved = retained_job(proc)
    results = at_once(resumer(proc, job), resumer(proc, job))
    won = [r for r in results if not isinstance(r, Exception)]
    lost = [r for r in results if isinstance(r, Exception)]
    assert len(won) == 1 and len(lost) == 1, results
    assert isinstance(lost[0], stated.AlreadyAttachedError) and f"job {job!r} rank 0 is already attached" in str(lost[0])
    opt, params = won[0]
    assert opt.resumed_step == 2
    assert_same(params, saved)
    opt.close(keep=True)
    again, params = resumer(proc, job)()  # the one that lost resumes once the other let go
    assert again.resumed_step == 2
    assert_same(params, saved)
    again.close()
    assert_clean_log(proc)


def test_many_ranks_resume_at_once_after_a_daemon_restart(spawn):
    paged = ("--host-memory", "256KiB", *SMALL_PAGES)
    proc = spawn("daemon", *paged)
    job, ranks = unique("job"), 6
    saved = {rank: retained_job(proc, steps=3, rank=rank, job=job)[1] for rank in range(ranks)}
    assert proc.stop(signal.SIGKILL) != 0
    proc = spawn("daemon", *paged)
    results = at_once(*(resumer(proc, job, rank) for rank in range(ranks) for _ in range(2)))
    for rank in range(ranks):
        pair = results[2 * rank: 2 * rank + 2]
        won = [r for r in pair if not isinstance(r, Exception)]
        assert len(won) == 1, pair
        assert all(isinstance(r, stated.AlreadyAttachedError) for r in pair if isinstance(r, Exception)), pair
        opt, params = won[0]
        assert opt.resumed_step == 3
        assert_same(params, saved[rank])
        opt.close()
    assert checkpoint_files(proc) == []
    assert_clean_log(proc)


def drop(proc, job: str):
    channel, stub = proc.stub()
    with channel:
        return stub.Drop(pb.DropRequest(job=job, admin_token=proc.admin_token()))


def test_a_resume_racing_stated_drop_gets_all_of_the_state_or_none(spawn):
    proc = spawn("daemon", *SMALL_PAGES)
    outcomes = set()
    for _ in range(4):
        job, saved = retained_job(proc)
        resumed, dropped = at_once(resumer(proc, job), lambda: drop(proc, job))
        opt, params = resumed
        if isinstance(dropped, Exception):  # the resume came first: the drop is refused, naming the live rank
            assert "holds no retained state (ranks [0] are live)" in dropped.details(), dropped
            assert opt.resumed_step == 2
            assert_same(params, saved)
            outcomes.add("resumed")
        else:  # the drop came first: its files are gone, and the resume starts afresh
            assert [j.step for j in dropped.dropped] == [2]
            assert opt.resumed_step is None
            assert not any(path.startswith(job) for path in checkpoint_files(proc))
            outcomes.add("dropped")
        opt.close()
    assert outcomes, "no round finished"
    assert_clean_log(proc)


def test_retention_running_out_during_a_resume_leaves_all_of_the_state_or_none(spawn):
    proc = spawn("daemon", "--retain", "1s", *SMALL_PAGES)
    bystander = Bystander(proc)
    for wait in (0.7, 1.0, 1.3, 1.6):  # around the deadline (retention is checked every second)
        job, saved = retained_job(proc)
        time.sleep(wait)
        opt, params = resumer(proc, job)()
        if opt.resumed_step is None:
            assert not any(path.startswith(job) for path in checkpoint_files(proc)), "retention took the files"
        else:
            assert opt.resumed_step == 2
            assert_same(params, saved)
        opt.close()
        bystander.step_and_checkpoint()
    bystander.close()
    assert_clean_log(proc)


def trainer(proc, job: str) -> subprocess.Popen:
    """A trainer process that trains 3 steps of `job` and says "ready"."""
    here = os.path.join(os.path.dirname(os.path.dirname(__file__)), "e2e")
    process = subprocess.Popen([sys.executable, "-c", TRAINER, proc.address, job, here], stdout=subprocess.PIPE,
                               text=True, env=dict(os.environ, STATED_EMBEDDED="0"))
    assert process.stdout.readline().strip() == "ready"
    return process


@pytest.mark.parametrize("resume", [True, False], ids=["resume", "no-resume"])
def test_a_trainer_killed_and_another_started_at_once(spawn, resume):
    proc = spawn("daemon", *SMALL_PAGES)
    job = unique("job")
    process = trainer(proc, job)
    process.kill()
    process.wait()
    fresh = make_model(seed=6)
    if resume:
        opt = stated.AdamW(fresh.parameters(), address=proc.address, job=job, resume=True, **HYPER)
        assert opt.resumed_step == 3
        replay = make_model()
        train(replay, stated.AdamW(replay.parameters(), address=proc.address, job=unique("replay"), **HYPER), 1, 3)
        assert_same(params_of(fresh), params_of(replay))
        opt.close()
    else:  # the daemon waits for the old trainer's end, then says what it retained and both ways out
        with pytest.raises(stated.FailedPreconditionError) as refused:
            stated.AdamW(fresh.parameters(), address=proc.address, job=job, **HYPER)
        for part in (f"job {job!r} rank 0 has retained state at step 3", f"pid {process.pid}", "resume=True",
                     f"stated drop {job}"):
            assert part in str(refused.value), str(refused.value)
        assert jobs(proc)[(job, 0)].state == "retained"
    assert_clean_log(proc)


def test_a_checkpoint_racing_close_with_keep_leaves_the_state_to_resume(spawn):
    proc = spawn("daemon", *SMALL_PAGES)
    for _ in range(6):
        job = unique("job")
        model = make_model()
        opt = stated.AdamW(model.parameters(), address=proc.address, job=job, **HYPER)
        train(model, opt, 1, 3)
        saved = params_of(model)
        checkpointed, closed = at_once(opt.checkpoint, lambda: opt.close(keep=True))
        assert closed is None
        assert checkpointed == 3 or isinstance(checkpointed, stated.FailedPreconditionError), checkpointed
        held = jobs(proc)[(job, 0)]
        assert (held.state, held.step) == ("retained", 3)
        again, params = resumer(proc, job)()
        assert again.resumed_step == 3
        assert_same(params, saved)
        again.close()
    assert checkpoint_files(proc) == []
    assert_clean_log(proc)


# A trainer whose checkpoint (or resume) takes a while: 16.8M parameters, about 200 MB to write or read.
BIG_TRAINER = """
import sys, time, torch, stated
torch.manual_seed(0)
model = torch.nn.Linear(4096, 4096)
opt = stated.AdamW(model.parameters(), address=sys.argv[1], job=sys.argv[2], resume=sys.argv[3] == "resume")
if sys.argv[3] != "resume":
    model.weight.grad, model.bias.grad = torch.ones_like(model.weight), torch.ones_like(model.bias)
    opt.step()
    print("ready", flush=True)
    opt.checkpoint()
time.sleep(600)
"""


def big_trainer(proc, job: str, mode: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", BIG_TRAINER, proc.address, job, mode], stdout=subprocess.PIPE,
                            text=True, env=dict(os.environ, STATED_EMBEDDED="0"))


def wait_for(condition, what: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {seconds} s"
        time.sleep(0.002)


def test_a_trainer_killed_mid_checkpoint_stays_attached_until_the_checkpoint_ends(spawn):
    proc = spawn("daemon", "--host-memory", "1MiB", *SMALL_PAGES)  # 2048 pages read from disk: seconds
    job = unique("job")
    trainer = big_trainer(proc, job, "train")
    assert trainer.stdout.readline().strip() == "ready"
    rank_dir = os.path.join(proc.directory, "state", "checkpoints", job, "rank-0")
    wait_for(lambda: os.path.exists(os.path.join(rank_dir, "1.pages")), "checkpoint under way")
    trainer.kill()
    trainer.wait()
    # Until its checkpoint ends the session is handed to no one (a resume could step during it).
    wait_for(lambda: jobs(proc)[(job, 0)].state == "retained", "retained state")
    assert os.path.exists(os.path.join(rank_dir, "1.manifest")), "retained while its checkpoint was still written"
    fresh = torch.nn.Linear(4096, 4096)
    opt = stated.AdamW(fresh.parameters(), address=proc.address, job=job, resume=True, **HYPER)
    assert opt.resumed_step == 1 and jobs(proc)[(job, 0)].durable_step == 1
    opt.close()
    assert_clean_log(proc)


def test_a_trainer_killed_while_its_resume_loads_leaves_the_state_retained(spawn):
    proc = spawn("daemon")
    job = unique("job")
    torch.manual_seed(0)
    model = torch.nn.Linear(4096, 4096)
    opt = stated.AdamW(model.parameters(), address=proc.address, job=job, **HYPER)
    model.weight.grad, model.bias.grad = torch.ones_like(model.weight), torch.ones_like(model.bias)
    opt.step()
    assert opt.checkpoint() == 1
    saved = [p.detach().clone() for p in model.parameters()]
    assert proc.stop(signal.SIGKILL) != 0
    proc = spawn("daemon")
    trainer = big_trainer(proc, job, "resume")

    def loading() -> bool:  # the daemon has the checkpoint's data files open: the resume reads them
        fds = f"/proc/{proc.process.pid}/fd"
        names = []
        for fd in os.listdir(fds):
            with contextlib.suppress(OSError):
                names.append(os.readlink(os.path.join(fds, fd)))
        return any(name.endswith((".pages", ".params", ".small")) for name in names)

    wait_for(loading, "resume loading")
    trainer.kill()
    trainer.wait()
    wait_for(lambda: not loading(), "the resume's load to end")
    time.sleep(0.5)  # the attach it did for no one is undone on the event loop, right after
    held = jobs(proc)[(job, 0)]
    assert held.state == "retained" and held.pid != trainer.pid, "the dead trainer's session stayed attached"
    fresh = torch.nn.Linear(4096, 4096)
    again = stated.AdamW(fresh.parameters(), address=proc.address, job=job, resume=True, **HYPER)
    assert again.resumed_step == 1
    assert_same([p.detach() for p in fresh.parameters()], saved)
    again.close()
    assert_clean_log(proc)
