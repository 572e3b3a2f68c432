"""The state directory, as an adversarial user or a careless neighbour leaves it: held by another daemon,
a symlink, a file, read-only, and a checkpoints folder holding what someone else put there. A daemon
that cannot use it refuses to start with a sentence naming --state-dir and what to do; one that can
leaves others' files alone, recovers only what it wrote, and says why a checkpoint cannot be written."""

from __future__ import annotations

import contextlib
import os
import time
import shutil
import signal
import subprocess
import sys

import pytest

import stated
from adversarial_helpers import (HYPER, SMALL_PAGES, Bystander, assert_clean_log, assert_same, checkpointed_job, jobs,
                                 make_model, params_of, train, unique)


def serve_refused(tmp_path, *state_dirs: str) -> list[str]:
    """Runs `stated serve` on each of `state_dirs` at once; each must refuse to start. Returns what they said."""
    runs = [subprocess.Popen([sys.executable, "-m", "stated", "serve", "--socket", str(tmp_path / f"other-{i}.sock"),
                              "--metrics-addr", "none", "--state-dir", state_dir], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env=dict(os.environ, STATED_EMBEDDED="0"))
            for i, state_dir in enumerate(state_dirs)]
    said = []
    for run in runs:
        _, err = run.communicate(timeout=60)
        assert run.returncode == 1, err
        assert "Traceback" not in err, err
        said.append(err)
    return said


def test_a_second_daemon_on_the_same_state_dir_refuses_and_the_first_serves_on(spawn, tmp_path):
    proc = spawn("daemon", *SMALL_PAGES)
    bystander = Bystander(proc)
    bystander.step_and_checkpoint()
    state_dir = os.path.join(proc.directory, "state")
    [said] = serve_refused(tmp_path, state_dir)
    assert f"another stated daemon uses --state-dir {state_dir}; stop it or pick another directory" in said
    bystander.step_and_checkpoint()
    assert jobs(proc)[(bystander.job, 0)].durable_step == 4
    bystander.close()
    assert_clean_log(proc)


@contextlib.contextmanager
def read_only_mount(path):
    """An empty read-only tmpfs at `path` (root only)."""
    os.makedirs(path)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a read-only tmpfs needs root and mount(8)")
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_a_state_dir_the_daemon_cannot_use_is_refused_naming_it(tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    (tmp_path / "blocked").mkdir()
    (tmp_path / "blocked" / "checkpoints").write_text("someone else's file")
    with read_only_mount(tmp_path / "ro") as read_only:
        said = serve_refused(tmp_path, str(tmp_path / "a-file"), str(tmp_path / "blocked"),
                             os.path.join(read_only, "state"))
    assert f"--state-dir {tmp_path / 'a-file'} cannot be used: it is not a directory" in said[0]
    assert (f"--state-dir {tmp_path / 'blocked'} cannot be used: Not a directory: "
            f"{tmp_path / 'blocked' / 'checkpoints'}") in said[1]
    assert f"--state-dir {read_only}/state cannot be used: Read-only file system" in said[2]
    for sentence in said:
        assert "give a directory this user can write" in sentence


def test_a_state_dir_that_is_a_symlink_recovers_through_it(spawn, tmp_path):
    real = tmp_path / "elsewhere"
    real.mkdir()
    (tmp_path / "daemon").mkdir()
    os.symlink(real, tmp_path / "daemon" / "state")
    proc = spawn("daemon", *SMALL_PAGES)
    _, job, saved = checkpointed_job(proc)
    assert proc.stop(signal.SIGKILL) != 0
    assert os.listdir(real / "checkpoints") == [job]
    proc = spawn("daemon", *SMALL_PAGES)
    fresh = make_model(seed=4)
    again = stated.AdamW(fresh.parameters(), address=proc.address, job=job, resume=True, **HYPER)
    assert again.resumed_step == 2
    assert_same(params_of(fresh), saved)
    again.close()
    assert os.listdir(real / "checkpoints") == []
    assert_clean_log(proc)


def test_strays_in_the_checkpoints_folder_are_left_alone_and_not_recovered(spawn):
    proc = spawn("daemon", *SMALL_PAGES)
    opt, job, saved = checkpointed_job(proc)
    opt.close(keep=True)
    assert proc.stop(signal.SIGTERM) == 0
    root = os.path.join(proc.directory, "state", "checkpoints")
    ranks = os.path.join(root, job)
    strays = [os.path.join(root, "README"), os.path.join(ranks, "notes.txt")]
    for path in strays:
        with open(path, "w") as f:
            f.write("someone else's")
    os.makedirs(os.path.join(root, "stray-job", "not-a-rank"))
    os.makedirs(os.path.join(ranks, "rank-0", "9.manifest"))  # a directory named like a newer manifest
    # Copies under names this daemon never writes: neither recovered (resume and drop could not find
    # them) nor removed.
    shutil.copytree(os.path.join(ranks, "rank-0"), os.path.join(ranks, "rank-007"))
    shutil.copytree(ranks, os.path.join(root, "copy of " + job))
    # A manifest whose data files are missing.
    os.makedirs(os.path.join(root, "ghost", "rank-0"))
    shutil.copy(os.path.join(ranks, "rank-0", "2.manifest"), os.path.join(root, "ghost", "rank-0", "5.manifest"))

    proc = spawn("daemon", *SMALL_PAGES)
    assert {k: (j.state, j.step) for k, j in jobs(proc).items()} == {(job, 0): ("recovered", 2)}
    log = proc.log()
    assert f"ignored {os.path.join(ranks, 'rank-007')}: it is not named as this daemon names job {job!r} rank 7" in log
    assert "checkpoint file" in log and "ghost" in log and "is missing" in log
    fresh = make_model(seed=8)
    again = stated.AdamW(fresh.parameters(), address=proc.address, job=job, resume=True, **HYPER)
    assert again.resumed_step == 2
    assert_same(params_of(fresh), saved)
    train(fresh, again, 3, 3)
    assert again.checkpoint() == 3
    again.close()
    for path in strays + [os.path.join(ranks, "rank-007", "2.manifest"), os.path.join(root, "copy of " + job)]:
        assert os.path.exists(path), path
    assert not os.path.exists(os.path.join(ranks, "rank-0")), "a clean close removes the job's own checkpoints"
    assert "Traceback" not in proc.log()


def block_checkpoints(proc, job: str) -> str:
    """Puts a file where the job's checkpoint directory goes, as someone else might; returns its path."""
    blocker = os.path.join(proc.directory, "state", "checkpoints", job)
    os.makedirs(os.path.dirname(blocker), exist_ok=True)
    with open(blocker, "w") as f:
        f.write("someone else's")
    return blocker


def test_a_checkpoint_that_cannot_be_written_says_why(spawn):
    proc = spawn("daemon", *SMALL_PAGES)
    job = unique("job")
    blocker = block_checkpoints(proc, job)
    bystander = Bystander(proc)
    model = make_model()
    opt = stated.AdamW(model.parameters(), address=proc.address, job=job, **HYPER)
    train(model, opt, 1, 2)
    with pytest.raises(stated.FailedPreconditionError) as refused:
        opt.checkpoint()
    for part in (f"checkpoint of job {job!r} rank 0 at step 2 failed", "Not a directory", "last checkpoint (none)",
                 f"--state-dir {os.path.join(proc.directory, 'state')} must be a directory this daemon can write"):
        assert part in str(refused.value), str(refused.value)
    bystander.step_and_checkpoint()
    os.unlink(blocker)
    train(model, opt, 3, 3)  # the refusal changed nothing: the steps go on, and the checkpoint once it can
    assert opt.checkpoint() == 3
    opt.close()
    bystander.close()
    assert_clean_log(proc)


def test_a_periodic_checkpoint_that_fails_does_not_fail_its_step(spawn):
    proc = spawn("daemon", "--checkpoint-every", "2", *SMALL_PAGES)
    job = unique("job")
    blocker = block_checkpoints(proc, job)
    bystander = Bystander(proc)
    model = make_model()
    opt = stated.AdamW(model.parameters(), address=proc.address, job=job, **HYPER)
    train(model, opt, 1, 4)  # steps 2 and 4 checkpoint, and cannot: the steps stand all the same
    bystander.step_and_checkpoint()
    held = jobs(proc)[(job, 0)]
    assert (held.step, held.durable) == (4, False)
    assert "the checkpoint of step 4 (--checkpoint-every 2) failed; the step stands" in proc.log()
    os.unlink(blocker)
    train(model, opt, 5, 6)
    # Step 6's checkpoint is written behind its reply (Note [checkpoints behind the step]).
    deadline = time.monotonic() + 20
    while jobs(proc)[(job, 0)].durable_step != 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert jobs(proc)[(job, 0)].durable_step == 6
    opt.close()
    bystander.close()
    assert_clean_log(proc)
