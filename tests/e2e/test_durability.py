"""Durable jobs end to end (README, "Durability"): checkpoints, a daemon killed and restarted on the same
--state-dir, a trainer killed and re-attached, retention, `stated jobs` and `stated drop`. Real daemons,
real files, real signals. The reference for "continues exactly" is the same training on a job that was
never interrupted: a resumed job must match it bit for bit."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest
import torch

import stated
from stated.v1 import state_service_pb2 as pb
from support.daemon import DaemonProcess

PAGE = 64 << 10
HYPER = dict(lr=3e-3, betas=(0.9, 0.99), weight_decay=0.05)


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 256), torch.nn.Tanh(), torch.nn.Linear(256, 4))


def train(model, opt, first: int, last: int) -> None:
    """Steps first..last, each with its own batch, so a resumed run sees the batches it missed."""
    for step in range(first, last + 1):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
        opt.zero_grad(set_to_none=False)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def params_of(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y), (x - y).abs().max()


def assert_same_state(a: dict, b: dict) -> None:
    assert a["state"].keys() == b["state"].keys()
    for index in a["state"]:
        for key in a["state"][index]:
            assert torch.equal(a["state"][index][key], b["state"][index][key]), (index, key)


def jobs(proc) -> dict[tuple[str, int], pb.JobStats]:
    channel, stub = proc.stub()
    with channel:
        return {(j.job, j.rank): j for j in stub.GetStats(proc.everything()).jobs}


def restart(proc: DaemonProcess, *extra: str) -> DaemonProcess:
    """A new daemon on the same socket and --state-dir as `proc` (which must be gone)."""
    again = DaemonProcess(proc.directory, *(extra or proc.extra))
    again.start()
    return again


def kill9(proc: DaemonProcess) -> None:
    os.kill(proc.process.pid, signal.SIGKILL)
    proc.process.wait()


def files_of(proc: DaemonProcess, job: str, rank: int = 0) -> list[str]:
    path = os.path.join(proc.directory, "state", "checkpoints", job, f"rank-{rank}")
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def assert_resumes_exactly_after_kill_9(proc, job: str, model, opt, fresh, step: int, saved_params=None,
                                        saved_state=None) -> None:
    """kill -9 of the daemon, a new one on its --state-dir, and `fresh` (other initial values) resumed:
    at `step`, with the parameters and state the trainer had then (by default, those of `model` and
    `opt` now)."""
    if saved_params is None:
        saved_params, saved_state = params_of(model), opt.state_dict()
    kill9(proc)
    proc = restart(proc)
    resumed = stated.AdamW(fresh.parameters(), address=proc.address, job=job, resume=True, **HYPER)
    assert resumed.resumed_step == step
    assert_same(params_of(fresh), saved_params)
    assert_same_state(resumed.state_dict(), saved_state)
    resumed.close()
    proc.stop()


PAGED = ("--host-memory", str(8 * PAGE), "--page-size", str(PAGE))


@pytest.mark.parametrize("extra", [(), PAGED], ids=["resident", "paged"])
def test_a_checkpoint_survives_kill_9_of_the_daemon_and_resumes_exactly(spawn, extra):
    proc = spawn("daemon", *extra)
    job = unique("job")
    model, reference = make_model(), make_model()
    opt = stated.AdamW(model.parameters(), address=proc.address, job=job, **HYPER)
    uninterrupted = stated.AdamW(reference.parameters(), address=proc.address, job=unique("ref"), **HYPER)
    train(model, opt, 1, 4)
    assert opt.checkpoint() == 4
    saved_params, saved_state = params_of(model), opt.state_dict()
    assert files_of(proc, job) == ["4.manifest", "4.pages", "4.params", "4.small"]
    train(model, opt, 5, 6)  # not durable: lost with the daemon
    train(reference, uninterrupted, 1, 4)
    reference_state = uninterrupted.state_dict()
    kill9(proc)

    proc = restart(proc)
    held = jobs(proc)[(job, 0)]
    assert (held.state, held.step, held.durable, held.durable_step) == ("recovered", 4, True, 4)
    assert held.memory_bytes == 0 and held.disk_bytes > 0, "recovery reads manifests, not pages"
    fresh = make_model(seed=7)  # other initial values: the daemon's must win
    resumed = stated.AdamW(fresh.parameters(), address=proc.address, job=job, resume=True, **HYPER)
    assert resumed.resumed_step == 4
    assert_same(params_of(fresh), saved_params)
    assert_same_state(resumed.state_dict(), saved_state)
    assert_same_state(resumed.state_dict(), reference_state)

    ref_proc = spawn("reference")  # the uninterrupted run goes on in a daemon of its own
    reference2 = make_model(seed=9)
    again = stated.AdamW(reference2.parameters(), address=ref_proc.address, job=unique("ref"), **HYPER)
    again.load_state_dict(reference_state)
    with torch.no_grad():
        for p, q in zip(reference2.parameters(), reference.parameters()):
            p.copy_(q)
    train(fresh, resumed, 5, 8)
    train(reference2, again, 5, 8)
    assert_same(params_of(fresh), params_of(reference2))
    assert_same_state(resumed.state_dict(), again.state_dict())
    resumed.close()
    assert files_of(proc, job) == [], "a clean close drops the checkpoints"
    proc.stop()


def test_sigterm_makes_every_session_durable_and_deletes_nothing(spawn):
    proc = spawn("daemon", *PAGED)
    job_a, job_b = unique("a"), unique("b")
    models = [make_model(), make_model(seed=1)]
    opts = [stated.AdamW(models[0].parameters(), address=proc.address, job=job_a, **HYPER),
            stated.AdamW(models[1].parameters(), address=proc.address, job=job_b, rank=3, **HYPER)]
    for model, opt in zip(models, opts):
        train(model, opt, 1, 5)
    saved = [params_of(m) for m in models]
    assert proc.stop(signal.SIGTERM) == 0
    assert "shutdown: 2 checkpoints written, 0 left at their last checkpoint" in proc.log()

    proc = restart(proc)
    held = jobs(proc)
    assert {k: (j.state, j.step) for k, j in held.items()} == {(job_a, 0): ("recovered", 5), (job_b, 3): ("recovered", 5)}
    for (job, rank), params in zip(((job_a, 0), (job_b, 3)), saved):
        fresh = make_model(seed=5)
        opt = stated.AdamW(fresh.parameters(), address=proc.address, job=job, rank=rank, resume=True, **HYPER)
        assert opt.resumed_step == 5
        assert_same(params_of(fresh), params)
        train(fresh, opt, 6, 6)  # and it steps on
        opt.close()
    proc.stop()


TRAINER = textwrap.dedent("""
    import os, sys, time, torch, stated
    sys.path[:0] = [sys.argv[3], os.path.dirname(sys.argv[3])]
    from test_durability import HYPER, make_model, train
    model = make_model()
    opt = stated.AdamW(model.parameters(), address=sys.argv[1], job=sys.argv[2], **HYPER)
    train(model, opt, 1, 3)
    print("ready", flush=True)
    time.sleep(600)
""")


def test_a_trainer_killed_with_kill_9_re_attaches_at_once(spawn):
    proc = spawn("daemon")
    job = unique("job")
    trainer = subprocess.Popen([sys.executable, "-c", TRAINER, proc.address, job, os.path.dirname(__file__)],
                               stdout=subprocess.PIPE, text=True, env=dict(os.environ, STATED_EMBEDDED="0"))
    try:
        assert trainer.stdout.readline().strip() == "ready"
    finally:
        trainer.kill()
        trainer.wait()
    # No waiting for the daemon to notice: the first attach after the kill already works.
    fresh = make_model(seed=4)
    opt = stated.AdamW(fresh.parameters(), address=proc.address, job=job, resume=True, **HYPER)
    assert opt.resumed_step == 3
    replay = make_model()
    ref = stated.AdamW(replay.parameters(), address=proc.address, job=unique("replay"), **HYPER)
    train(replay, ref, 1, 3)
    assert_same(params_of(fresh), params_of(replay))
    train(fresh, opt, 4, 5)
    train(replay, ref, 4, 5)
    assert_same(params_of(fresh), params_of(replay))
    assert f"its trainer (pid {trainer.pid}) died" in proc.log()


def test_retained_state_without_resume_is_refused_naming_both_ways_out(spawn):
    proc = spawn("daemon")
    job = unique("job")
    model = make_model()
    opt = stated.AdamW(model.parameters(), address=proc.address, job=job, **HYPER)
    train(model, opt, 1, 2)
    opt.close(keep=True)
    assert jobs(proc)[(job, 0)].state == "retained"
    with pytest.raises(stated.FailedPreconditionError) as refused:
        stated.AdamW(make_model().parameters(), address=proc.address, job=job, **HYPER)
    message = str(refused.value)
    for part in (repr(job), "step 2", "resume=True", f"stated drop {job}"):
        assert part in message, message
    assert jobs(proc)[(job, 0)].state == "retained", "a refused attach leaves the retained state alone"
    # resume=True for a (job, rank) with nothing retained starts afresh and says so.
    other = stated.AdamW(make_model().parameters(), address=proc.address, job=unique("new"), resume=True, **HYPER)
    assert other.resumed_step is None
    other.close()


def test_a_layout_mismatch_names_the_first_difference_and_keeps_the_state(spawn):
    proc = spawn("daemon")
    job = unique("job")
    model = make_model()
    opt = stated.AdamW(model.parameters(), address=proc.address, job=job, **HYPER)
    train(model, opt, 1, 2)
    saved = params_of(model)
    opt.close(keep=True)

    wider = torch.nn.Sequential(torch.nn.Linear(16, 128), torch.nn.Tanh(), torch.nn.Linear(128, 4))
    with pytest.raises(stated.InvalidArgumentError, match=r"tensors\[0\]\.shape is \[128, 16\], the retained state "
                                                           r"has \[256, 16\]"):
        stated.AdamW(wider.parameters(), address=proc.address, job=job, resume=True, **HYPER)
    with pytest.raises(stated.InvalidArgumentError, match="algorithm 'adamw', this optimizer 'sgd'"):
        stated.SGD(model.parameters(), lr=0.1, address=proc.address, job=job, resume=True)
    groups = [{"params": list(model.parameters())[:2]}, {"params": list(model.parameters())[2:]}]
    with pytest.raises(stated.InvalidArgumentError, match="tensors sent, the retained state has 4"):
        stated.AdamW(groups, address=proc.address, job=job, resume=True, **HYPER)
    assert jobs(proc)[(job, 0)].state == "retained"

    fresh = make_model(seed=3)
    again = stated.AdamW(fresh.parameters(), address=proc.address, job=job, resume=True, **HYPER)
    assert again.resumed_step == 2
    assert_same(params_of(fresh), saved)
    again.close()


def test_retention_runs_out_and_takes_the_checkpoints_with_it(spawn):
    proc = spawn("daemon", "--retain", "1s")
    job = unique("job")
    model = make_model()
    opt = stated.AdamW(model.parameters(), address=proc.address, job=job, **HYPER)
    train(model, opt, 1, 1)
    opt.checkpoint()
    opt.close(keep=True)
    held = jobs(proc)[(job, 0)]
    assert held.state == "retained" and 0 < held.retention_seconds_left <= 1.0
    deadline = time.monotonic() + 10
    while (job, 0) in jobs(proc):
        assert time.monotonic() < deadline, "retention did not run out"
        time.sleep(0.2)
    assert files_of(proc, job) == []
    assert "retention ran out for job=" in proc.log()


def run_cli(proc, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stated", *args, "--address", proc.address],
                          capture_output=True, text=True, timeout=60, env=dict(os.environ, STATED_EMBEDDED="0"))


def test_stated_jobs_lists_and_stated_drop_removes(spawn):
    proc = spawn("daemon")
    job = unique("job")
    models = [make_model(), make_model()]
    opts = [stated.AdamW(m.parameters(), address=proc.address, job=job, rank=r, **HYPER) for r, m in enumerate(models)]
    for model, opt in zip(models, opts):
        train(model, opt, 1, 2)
    opts[0].checkpoint()
    opts[0].close(keep=True)

    listing = run_cli(proc, "jobs")
    assert listing.returncode == 0, listing.stderr
    rows = {tuple(line.split()[:5]) for line in listing.stdout.splitlines()[1:]}
    assert (job, "0", "retained", "adamw", "2") in rows and (job, "1", "live", "adamw", "2") in rows
    row0 = [line for line in listing.stdout.splitlines() if line.split()[:3] == [job, "0", "retained"]][0]
    assert row0.split()[5] == "2" and "29m" in row0  # durable at step 2; retained for the default 30 minutes

    refused = run_cli(proc, "drop", job, "--rank", "1")
    assert refused.returncode == 1 and "is live" in refused.stderr and "opt.close()" in refused.stderr
    dropped = run_cli(proc, "drop", job)
    assert dropped.returncode == 0, dropped.stderr
    assert f"dropped job {job!r} rank 0 (retained at step 2" in dropped.stdout
    assert set(jobs(proc)) == {(job, 1)} and files_of(proc, job) == []
    missing = run_cli(proc, "drop", job)
    assert missing.returncode == 1 and "holds no retained state (ranks [1] are live)" in missing.stderr
    opts[1].close()


def test_ranks_of_one_job_register_at_once_on_a_paging_daemon(spawn):
    proc = spawn("daemon", *PAGED)
    job, ranks = unique("job"), 8
    opts, errors = {}, []

    def attach(rank: int) -> None:
        try:
            opts[rank] = stated.AdamW(make_model(rank).parameters(), address=proc.address, job=job, rank=rank,
                                      **HYPER)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=attach, args=(r,)) for r in range(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    stats = {s.rank: s for s in opts[0]._connection.call("GetStats", pb.GetStatsRequest(session=opts[0]._session)).sessions if s.job == job}
    assert sorted(stats) == list(range(ranks))
    from stated.paging.state_file import HEADER_BYTES, state_path

    for rank, session in stats.items():  # a state file each (a checkpoint freezes its rank's alone)
        path = state_path(os.path.join(proc.directory, "state"), job, rank)
        assert os.path.getsize(path) == HEADER_BYTES + session.pages * PAGE
    for opt in opts.values():
        opt.close()


def test_checkpoint_every_n_steps_keeps_the_newest_two(spawn):
    proc = spawn("daemon", "--checkpoint-every", "2")
    job = unique("job")
    model = make_model()
    opt = stated.AdamW(model.parameters(), address=proc.address, job=job, **HYPER)
    train(model, opt, 1, 7)
    held = jobs(proc)[(job, 0)]
    assert (held.step, held.durable_step) == (7, 6)
    assert files_of(proc, job) == sorted(f"{s}.{k}" for s in (4, 6) for k in ("manifest", "pages", "params", "small"))
    assert opt.checkpoint() == 7
    assert opt.checkpoint() == 7  # nothing changed: durable already
    assert [f for f in files_of(proc, job) if f.endswith(".manifest")] == ["6.manifest", "7.manifest"]
    opt.close()


def test_a_checkpoint_writes_only_the_pages_that_changed_and_keeps_the_files_it_still_reads(spawn):
    proc = spawn("daemon", "--page-size", str(PAGE))
    job = unique("job")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 1024), torch.nn.Tanh(), torch.nn.Linear(1024, 4))
    frozen = list(model[0].parameters())  # 17408 elements: two whole pages of 8192 (64 KiB of AdamW state)
    opt = stated.AdamW(model.parameters(), address=proc.address, job=job, **HYPER)

    def steps(first: int, last: int, freeze: bool) -> None:
        for step in range(first, last + 1):
            g = torch.Generator().manual_seed(step)
            opt.zero_grad(set_to_none=False)
            torch.nn.functional.mse_loss(model(torch.randn(8, 16, generator=g)), torch.randn(8, 4, generator=g)).backward()
            if freeze:
                for p in frozen:
                    p.grad = None
            opt.step()

    def pages_file(step: int) -> int:
        return os.path.getsize(os.path.join(proc.directory, "state", "checkpoints", job, "rank-0", f"{step}.pages"))

    steps(1, 2, freeze=False)
    assert opt.checkpoint() == 2
    steps(3, 3, freeze=True)
    assert opt.checkpoint() == 3
    steps(4, 4, freeze=True)
    assert opt.checkpoint() == 4
    assert pages_file(3) == pages_file(4) < pages_file(2), "unchanged pages are not written again"
    # Checkpoints 3 and 4 are kept; 2 goes, but for the pages file they both still read.
    assert files_of(proc, job) == ["2.pages"] + sorted(f"{s}.{k}" for s in (3, 4)
                                                      for k in ("manifest", "pages", "params", "small"))
    fresh = torch.nn.Sequential(torch.nn.Linear(16, 1024), torch.nn.Tanh(), torch.nn.Linear(1024, 4))
    assert_resumes_exactly_after_kill_9(proc, job, model, opt, fresh, 4)


def moved(proc) -> dict[str, float]:
    """stated_transfer_bytes_total by path, scraped from the daemon's Prometheus endpoint."""
    return {dict(labels)["path"]: value for (name, labels), value in proc.samples().items()
            if name == "stated_transfer_bytes_total"}


def test_a_paged_checkpoint_freezes_the_state_file_and_reads_no_spilled_page(spawn):
    """Note [frozen state files]: the spilled pages are on disk already; the checkpoint writes the
    resident ones to the state file and makes it the checkpoint's `.pages`, reading nothing back."""
    proc = spawn("daemon", *PAGED)
    job = unique("job")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 4096), torch.nn.Tanh(), torch.nn.Linear(4096, 4))
    opt = stated.AdamW(model.parameters(), address=proc.address, job=job, **HYPER)
    train(model, opt, 1, 3)
    session = next(s for s in opt._connection.call("GetStats", pb.GetStatsRequest(session=opt._session)).sessions if s.job == job)
    assert 0 < session.resident_capacity < session.pages
    before = moved(proc)
    assert opt.checkpoint() == 3
    after = moved(proc)
    assert after["disk_to_host"] == before["disk_to_host"], "a spilled page was read back"
    written = after["host_to_disk"] - before["host_to_disk"]
    assert 0 < written <= session.resident_capacity * PAGE, "only resident pages are written"
    from stated.paging.state_file import HEADER_BYTES, state_path

    live = state_path(os.path.join(proc.directory, "state"), job)
    frozen = os.path.join(proc.directory, "state", "checkpoints", job, "rank-0", "3.pages")
    assert os.path.getsize(frozen) == HEADER_BYTES + session.pages * PAGE
    assert os.stat(frozen).st_ino != os.stat(live).st_ino and os.stat(frozen).st_nlink == 1
    saved_params, saved_state = params_of(model), opt.state_dict()

    other = unique("other")  # generations over several checkpoints: only the newest two stay
    second = torch.nn.Sequential(torch.nn.Linear(16, 4096), torch.nn.Tanh(), torch.nn.Linear(4096, 4))
    opt2 = stated.AdamW(second.parameters(), address=proc.address, job=other, **HYPER)
    for step in (2, 4, 6):
        train(second, opt2, step - 1, step)
        assert opt2.checkpoint() == step
    assert files_of(proc, other) == sorted(f"{s}.{k}" for s in (4, 6) for k in ("manifest", "pages", "params", "small"))

    train(model, opt, 4, 5)  # into the live file's next generation: the frozen one stays as it was
    fresh = torch.nn.Sequential(torch.nn.Linear(16, 4096), torch.nn.Tanh(), torch.nn.Linear(4096, 4))
    assert_resumes_exactly_after_kill_9(proc, job, model, opt, fresh, 3, saved_params, saved_state)


def test_checkpoints_on_another_file_system_copy_the_pages_and_resume_exactly(tmp_path):
    """`checkpoints/` a symlink to another file system (/dev/shm, a tmpfs): the state file cannot be
    linked there (EXDEV), so a paged checkpoint copies its pages, says so once, and is as good."""
    elsewhere = f"/dev/shm/stated-test-{uuid.uuid4().hex[:8]}"
    os.makedirs(elsewhere)
    try:
        os.makedirs(tmp_path / "state")
        os.symlink(elsewhere, tmp_path / "state" / "checkpoints")
        if os.stat(elsewhere).st_dev == os.stat(tmp_path).st_dev:
            pytest.skip("/dev/shm is on the same file system as the tests' temporary directory here")
        proc = DaemonProcess(tmp_path, *PAGED)
        proc.start()
        job = unique("job")
        model = torch.nn.Sequential(torch.nn.Linear(16, 4096), torch.nn.Tanh(), torch.nn.Linear(4096, 4))
        opt = stated.AdamW(model.parameters(), address=proc.address, job=job, **HYPER)
        train(model, opt, 1, 2)
        assert opt.checkpoint() == 2
        train(model, opt, 3, 3)
        assert opt.checkpoint() == 3
        assert proc.log().count("cannot be linked into") == 1, proc.log()
        assert files_of(proc, job) == sorted(f"{s}.{k}" for s in (2, 3) for k in ("manifest", "pages", "params", "small"))
        fresh = torch.nn.Sequential(torch.nn.Linear(16, 4096), torch.nn.Tanh(), torch.nn.Linear(4096, 4))
        assert_resumes_exactly_after_kill_9(proc, job, model, opt, fresh, 3)
    finally:
        shutil.rmtree(elsewhere, ignore_errors=True)


def test_a_checkpoint_without_waiting_overlaps_the_next_forward_and_is_exact(spawn):
    proc = spawn("daemon")
    job = unique("job")
    model = make_model()
    opt = stated.AdamW(model.parameters(), address=proc.address, job=job, **HYPER)
    train(model, opt, 1, 3)
    saved_params, saved_state = params_of(model), opt.state_dict()
    assert opt.checkpoint(wait=False) == 3  # returns at once; the next step waits for it
    train(model, opt, 4, 4)
    assert jobs(proc)[(job, 0)].durable_step == 3
    assert_resumes_exactly_after_kill_9(proc, job, model, opt, make_model(seed=2), 3, saved_params, saved_state)


def test_a_failed_checkpoint_without_waiting_is_raised_by_the_next_step(spawn):
    proc = spawn("daemon")
    model = make_model()
    opt = stated.AdamW(model.parameters(), address=proc.address, job=unique("job"), **HYPER)
    train(model, opt, 1, 1)
    state_dir = os.path.join(proc.directory, "state")
    os.rename(state_dir, state_dir + ".away")  # the daemon's state directory disappears
    with open(state_dir, "w") as f:
        f.write("in the way")
    opt.checkpoint(wait=False)
    with pytest.raises(stated.StatedError, match="cannot write|state file|checkpoint") as failed:
        train(model, opt, 2, 2)
    assert failed.value.code in ("FAILED_PRECONDITION", "RESOURCE_EXHAUSTED"), failed.value
    train(model, opt, 2, 2)  # the error was reported once; training goes on
    os.unlink(state_dir)
    os.rename(state_dir + ".away", state_dir)
    assert opt.checkpoint() == 2
    opt.close()


def test_sigterm_keeps_to_its_shutdown_timeout_and_the_previous_checkpoint_stays_whole(spawn):
    """A checkpoint that --shutdown-timeout cuts short gives up at its next page and removes what it
    wrote: the daemon stops within the bound and the checkpoint before it is what a new daemon finds."""
    proc = spawn("daemon", "--shutdown-timeout", "0.05s", "--page-size", "1MiB")
    job = unique("big")
    p = torch.nn.Parameter(torch.zeros(40_000_000))  # 480 MB to checkpoint: far more than 0.05 s
    opt = stated.AdamW([p], address=proc.address, job=job)
    p.grad = torch.ones_like(p)
    opt.step()
    assert opt.checkpoint() == 1
    opt.step()
    started = time.monotonic()
    assert proc.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 10
    assert "shutdown: 0 checkpoints written, 1 left at their last checkpoint" in proc.log()
    assert files_of(proc, job) == ["1.manifest", "1.pages", "1.params", "1.small"]
    proc = restart(proc)
    assert (jobs(proc)[(job, 0)].state, jobs(proc)[(job, 0)].step) == ("recovered", 1)
    proc.stop()
