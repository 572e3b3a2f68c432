"""SIGTERM while a long checkpoint runs, with a --shutdown-timeout far shorter than it: the daemon exits
within the bound, the checkpoint is given up and its files removed, the previous checkpoint stays whole,
and what the daemon says it left is what a restarted daemon recovers. Both for the checkpoint shutdown
itself takes and for one a trainer asked for just before the signal."""

from __future__ import annotations

import os
import signal
import threading
import time

import torch

import stated
from adversarial_helpers import HYPER, assert_clean_log, assert_same, checkpoint_files, jobs, unique

TIMEOUT = 0.01  # seconds: far less than the checkpoint of BIG takes on any disk (20 GB/s)
BIG = (4096, 4096)  # 16.8M parameters: about 200 MB of parameters and AdamW state to write


def big_job(proc):
    """A BIG job checkpointed at step 1 and stepped to 2: (its optimizer, its parameters at step 1)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(*BIG)
    opt = stated.AdamW(model.parameters(), address=proc.address, job=unique("big"), **HYPER)
    model.weight.grad, model.bias.grad = torch.randn_like(model.weight), torch.randn_like(model.bias)
    opt.step()
    assert opt.checkpoint() == 1
    at_step_1 = [p.detach().clone() for p in model.parameters()]
    opt.step()
    return opt, at_step_1


def stop_within_the_bound(proc, job: str) -> None:
    start = time.monotonic()
    os.kill(proc.process.pid, signal.SIGTERM)
    assert proc.process.wait(timeout=60) == 0
    # The bound, with the second the gRPC server is given to finish its calls and a margin for a loaded machine.
    assert time.monotonic() - start < TIMEOUT + 1.0 + 4.0, proc.log()[-3000:]
    assert f"job={job} rank=0 not made durable within --shutdown-timeout; it stays at its last checkpoint " \
           f"(step 1)" in proc.log()


def resumes_at_step_1(proc, job: str, saved: list[torch.Tensor]) -> None:
    """The restarted daemon holds the job at step 1, every byte as it was, and nothing of step 2's checkpoint."""
    assert [f for f in checkpoint_files(proc) if f.startswith(job)] == [
        f"{job}/rank-0/1.{kind}" for kind in ("manifest", "pages", "params", "small")]
    assert (jobs(proc)[(job, 0)].state, jobs(proc)[(job, 0)].step) == ("recovered", 1)
    model = torch.nn.Linear(*BIG)
    opt = stated.AdamW(model.parameters(), address=proc.address, job=job, resume=True, **HYPER)
    assert opt.resumed_step == 1
    assert_same([p.detach() for p in model.parameters()], saved)
    opt.close()


def test_sigterm_gives_up_the_shutdown_checkpoint_at_the_bound(spawn):
    flags = ("--shutdown-timeout", f"{TIMEOUT}s")
    proc = spawn("daemon", *flags)
    opt, saved = big_job(proc)
    stop_within_the_bound(proc, opt.job)
    assert_clean_log(proc)
    again = spawn("daemon", *flags)
    resumes_at_step_1(again, opt.job, saved)
    assert_clean_log(again)


def test_sigterm_during_a_trainers_checkpoint_gives_it_up_and_tells_the_trainer(spawn):
    flags = ("--shutdown-timeout", f"{TIMEOUT}s")
    proc = spawn("daemon", *flags)
    opt, saved = big_job(proc)
    told = []
    checkpointing = threading.Thread(target=lambda: told.append(_checkpoint_outcome(opt)))
    checkpointing.start()
    under_way = os.path.join(proc.directory, "state", "checkpoints", opt.job, "rank-0", "2.pages")
    deadline = time.monotonic() + 30
    while not os.path.exists(under_way):  # the checkpoint of step 2 has begun: far from done
        assert time.monotonic() < deadline and checkpointing.is_alive()
        time.sleep(0.002)
    stop_within_the_bound(proc, opt.job)
    checkpointing.join(60)
    assert len(told) == 1 and isinstance(told[0], stated.DaemonUnavailableError), told
    assert "shutting down" in str(told[0])
    assert_clean_log(proc)
    again = spawn("daemon", *flags)
    resumes_at_step_1(again, opt.job, saved)
    assert_clean_log(again)


def _checkpoint_outcome(opt):
    try:
        return opt.checkpoint()
    except stated.StatedError as exc:
        return exc
