"""Bad input to the durability features, tried as an adversarial user would: ranks the wire cannot carry,
job names with odd characters and names too long for a file name, `stated jobs` with long names, `stated
drop` of what is not there, and resumes built with another layout. Each is a refusal that says what was
wrong and what to do; the daemon keeps serving another job, and nothing durable is lost."""

from __future__ import annotations

import os
import signal

import pytest
import torch

import stated
from adversarial_helpers import (HYPER, SMALL_PAGES, Bystander, assert_clean_log, assert_same, checkpoint_files,
                                 checkpointed_job, cli, jobs, make_model, params_of, train, unique)

NOWHERE = "unix:///nonexistent/stated.sock"


def test_a_rank_the_wire_cannot_carry_is_refused_naming_it(monkeypatch):
    monkeypatch.setenv("STATED_EMBEDDED", "0")
    for rank in (-1, 1 << 32, 2.5, "first"):
        with pytest.raises(stated.InvalidArgumentError, match=r"a rank is a whole number from 0 to 4294967295"):
            stated.AdamW(make_model().parameters(), address=NOWHERE, job="j", rank=rank)
    monkeypatch.setenv("RANK", "-3")
    with pytest.raises(stated.InvalidArgumentError, match=r"\$RANK is '-3'"):
        stated.AdamW(make_model().parameters(), address=NOWHERE, job="j")


@pytest.mark.parametrize("rank", ["-1", "4294967296", "two"])
def test_stated_drop_refuses_a_rank_the_wire_cannot_carry(capsys, rank):
    status, _, err = cli(capsys, "drop", "job", "--rank", rank, "--address", NOWHERE)
    assert status == 2, err
    assert f"invalid rank {rank!r}: a rank is a whole number from 0 to 4294967295" in err


# Each through checkpoint, a SIGTERM recovery, `stated jobs` and `stated drop`.
ODD_NAMES = ["ünïcødé ジョブ", "has space", "per%cent", "a%2Fb", "..", ".hidden", "x" * 200, "tab\tsemi;quote'\""]


def test_odd_job_names_survive_checkpoint_restart_jobs_and_drop(spawn, capsys):
    proc = spawn("daemon", *SMALL_PAGES)
    saved = {}
    for seed, job in enumerate(ODD_NAMES):
        model = make_model(seed)
        opt = stated.AdamW(model.parameters(), address=proc.address, job=job, **HYPER)
        train(model, opt, 1, 2)
        assert opt.checkpoint() == 2
        saved[job] = params_of(model)
        opt.close(keep=True)
    assert proc.stop(signal.SIGTERM) == 0
    proc = spawn("daemon", *SMALL_PAGES)
    assert {k: (j.state, j.step) for k, j in jobs(proc).items()} == {(job, 0): ("recovered", 2) for job in ODD_NAMES}
    status, listing, err = cli(capsys, "jobs", "--address", proc.address)
    assert status == 0, err
    for job in ODD_NAMES:  # in full, as `stated drop` takes it
        assert any(line.startswith(job + " ") for line in listing.splitlines()), (job, listing)
    for job in ODD_NAMES:
        fresh = make_model(seed=99)
        opt = stated.AdamW(fresh.parameters(), address=proc.address, job=job, resume=True, **HYPER)
        assert opt.resumed_step == 2
        assert_same(params_of(fresh), saved[job])
        opt.close(keep=True)
    for job in ODD_NAMES:
        status, out, err = cli(capsys, "drop", job, "--address", proc.address)
        assert status == 0 and f"dropped job {job!r} rank 0" in out, err
    assert jobs(proc) == {} and checkpoint_files(proc) == []
    assert_clean_log(proc)


def test_a_job_name_too_long_for_a_file_name_is_refused_at_attach(spawn):
    # A paging daemon: the job's state file is named after it too.
    proc = spawn("daemon", "--host-memory", "256KiB", *SMALL_PAGES)
    bystander = Bystander(proc)
    for job in (" " * 100, "é" * 200, "ジ" * 26):
        with pytest.raises(stated.InvalidArgumentError, match=r"too long as a file name.*choose a shorter name"):
            stated.AdamW(torch.nn.Linear(256, 256).parameters(), address=proc.address, job=job, **HYPER)
        bystander.step_and_checkpoint()
    # 25 * 9 bytes percent-encoded, and ".4294967295.next.state" (a state file's next generation): 247 bytes
    longest = "ジ" * 25
    model = torch.nn.Linear(256, 256)
    opt = stated.AdamW(model.parameters(), address=proc.address, job=longest, **HYPER)
    model.weight.grad, model.bias.grad = torch.ones(256, 256), torch.ones(256)
    opt.step()
    assert opt.checkpoint() == 1
    opt.close()
    bystander.close()
    assert_clean_log(proc)


def test_stated_drop_of_what_is_not_there_says_so(spawn, capsys):
    proc = spawn("daemon", *SMALL_PAGES)
    bystander = Bystander(proc)
    bystander.step_and_checkpoint()
    for args, says in ((("nojob",), "job 'nojob' holds no retained state"),
                       (("nojob", "--rank", "4294967295"), "job 'nojob' rank 4294967295 holds no retained state"),
                       ((bystander.job,), f"job {bystander.job!r} holds no retained state (ranks [0] are live)"),
                       ((bystander.job, "--rank", "0"), "is live")):
        status, _, err = cli(capsys, "drop", *args, "--address", proc.address)
        assert status == 1 and says in err, err
        assert "stated jobs" in err or "opt.close()" in err
    bystander.step_and_checkpoint()
    assert jobs(proc)[(bystander.job, 0)].durable_step == 4
    bystander.close()
    assert_clean_log(proc)


def _groups(model, split: int) -> list[dict]:
    params = list(model.parameters())
    return [{"params": params[:split]}, {"params": params[split:]}]


def test_a_resume_built_otherwise_is_refused_naming_it_and_keeps_the_state(spawn):
    proc = spawn("daemon", *SMALL_PAGES)
    opt, job, saved = checkpointed_job(proc, steps=3, named=True)
    opt.close(keep=True)
    files = checkpoint_files(proc)
    other = make_model(seed=5)
    extra = torch.nn.Parameter(torch.zeros(3))
    attempts = [
        # One group more than the retained state: the extra group must not be registered into it.
        (lambda: [{"params": list(other.named_parameters())}, {"params": [("extra", extra)]}],
         {}, stated.InvalidArgumentError, "the retained state has 1 param groups, this optimizer 2"),
        (lambda: other.named_parameters(), {"amsgrad": True}, stated.InvalidArgumentError,
         "would change the state layout"),
        (lambda: other.named_parameters(), {"master_weights": True}, stated.InvalidArgumentError,
         "master_weights False, this optimizer True"),
        (lambda: other.parameters(), {}, stated.InvalidArgumentError, r"tensors\[0\]\.name is '', the retained state "
                                                                      r"has '0\.weight'"),
        (lambda: reversed(list(other.named_parameters())), {}, stated.InvalidArgumentError,
         r"tensors\[0\]\.shape is \[4\], the retained state has \[256, 16\]"),
        (lambda: [(n, p.detach().double().requires_grad_()) for n, p in other.named_parameters()], {},
         stated.InvalidArgumentError, "float64"),
    ]
    for params, extra_args, error, says in attempts:
        with pytest.raises(error, match=says):
            stated.AdamW(params(), address=proc.address, job=job, resume=True, **{**HYPER, **extra_args})
        assert jobs(proc)[(job, 0)].state == "retained" and jobs(proc)[(job, 0)].step == 3
        assert checkpoint_files(proc) == files, "a refused resume leaves the checkpoints alone"
    # Another learning rate changes no state layout: it resumes, with the state it had.
    opt = stated.AdamW(other.named_parameters(), address=proc.address, job=job, resume=True,
                       **{**HYPER, "lr": 1e-4})
    assert opt.resumed_step == 3
    assert_same(params_of(other), saved)
    train(other, opt, 4, 4)
    opt.close()
    assert checkpoint_files(proc) == []
    assert_clean_log(proc)


def test_a_layout_mismatch_after_a_daemon_restart_keeps_the_recovered_checkpoint(spawn):
    proc = spawn("daemon", *SMALL_PAGES)
    job = unique("job")
    model = make_model()
    opt = stated.AdamW(_groups(model, 2), address=proc.address, job=job, **HYPER)
    train(model, opt, 1, 2)
    assert opt.checkpoint() == 2
    saved = params_of(model)
    proc.stop(signal.SIGKILL)
    proc = spawn("daemon", *SMALL_PAGES)
    other = make_model(seed=3)
    for params in (lambda: other.parameters(), lambda: _groups(other, 2) + [{"params": [torch.nn.Parameter(
            torch.zeros(2))]}], lambda: _groups(other, 1)):
        with pytest.raises(stated.InvalidArgumentError, match="resume of job"):
            stated.AdamW(params(), address=proc.address, job=job, resume=True, **HYPER)
        assert jobs(proc)[(job, 0)].step == 2
    opt = stated.AdamW(_groups(other, 2), address=proc.address, job=job, resume=True, **HYPER)
    assert opt.resumed_step == 2
    assert_same(params_of(other), saved)
    opt.close()
    assert_clean_log(proc)
    assert os.listdir(os.path.join(proc.directory, "state", "checkpoints")) == []
