"""Paging end to end: a real daemon with --host-memory below the state, real O_DIRECT state files, the
metrics scraped over HTTP. Pages are 64 KiB so that a small model spans many of them."""

from __future__ import annotations

import os
import shutil
import uuid

import pytest
import torch

import stated
from stated.paging.state_file import HEADER_BYTES, align_up, state_path
from stated.v1 import state_service_pb2 as pb
from support.daemon import DaemonProcess

PAGE = 64 << 10


def make_model(seed: int = 0, width: int = 512) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, width), torch.nn.Tanh(), torch.nn.Linear(width, width),
                               torch.nn.Tanh(), torch.nn.Linear(width, 4))


def state_bytes(model) -> int:
    return 8 * sum(p.numel() for p in model.parameters())


def train(model, opt, steps: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(16, 32, generator=g), torch.randn(16, 4, generator=g)
        opt.zero_grad(set_to_none=False)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def session_stats(opt) -> pb.SessionStats:
    stats = opt._connection.call("GetStats", pb.GetStatsRequest(session=opt._session))
    return [s for s in stats.sessions if s.id == opt.session_id][0]


@pytest.fixture(scope="module")
def quarter(tmp_path_factory):
    """A daemon whose host budget is 25% of one test model's state."""
    budget = state_bytes(make_model()) // 4
    proc = DaemonProcess(tmp_path_factory.mktemp("paged"), "--host-memory", str(budget), "--page-size", str(PAGE))
    proc.start()
    yield proc
    proc.stop()
    assert proc.leaked_segments() == []
    # The lock file stays (removing it would race a daemon that is taking it); nothing else does.
    assert [n for n in os.listdir(os.path.join(proc.directory, "state")) if n != ".lock"] == [], \
        "state files outlive their jobs"


def test_quarter_budget_gives_the_unpaged_results(quarter, daemon):
    """100 steps at 25% budget: identical to the unpaged run, and to torch.optim.AdamW(fused=True)."""
    models = [make_model() for _ in range(3)]
    paged = stated.AdamW(models[0].parameters(), lr=1e-3, address=quarter.address)
    unpaged = stated.AdamW(models[1].parameters(), lr=1e-3, address=daemon.address)
    reference = torch.optim.AdamW(models[2].parameters(), lr=1e-3, fused=True)
    for model, opt in zip(models, (paged, unpaged, reference)):
        train(model, opt, 100)
    stats = session_stats(paged)
    assert stats.resident_capacity < stats.pages, "the budget must really force paging"
    assert stats.page_faults > 100
    for p, q, r in zip(*(m.parameters() for m in models)):
        assert torch.equal(p, q)
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)
    a, b = paged.state_dict()["state"], unpaged.state_dict()["state"]
    for index in b:
        for key in b[index]:
            assert torch.equal(a[index][key], b[index][key])
    paged.close()
    unpaged.close()


def test_steady_state_step_faults_n_minus_h_times(quarter):
    """With N pages and room for H, a steady-state step faults N - H times, give or take one (metrics)."""
    model = make_model(seed=3)
    opt = stated.AdamW(model.parameters(), lr=1e-3, address=quarter.address)
    train(model, opt, 3)  # the first step faults on every page; let residency settle
    stats = session_stats(opt)
    n, h = stats.pages, stats.resident_capacity
    assert 0 < h < n
    before = quarter.samples()
    steps = 10
    train(model, opt, steps)
    after = quarter.samples()
    key = ("stated_page_faults_total", (("tier", "host"),))
    faults = after[key] - before[key]
    assert (n - h) * steps <= faults <= (n - h + 1) * steps
    evictions = ("stated_page_evictions_total", (("tier", "host"),))
    assert after[evictions] - before[evictions] > 0
    moved_in = ("stated_transfer_bytes_total", (("path", "disk_to_host"),))
    moved_out = ("stated_transfer_bytes_total", (("path", "host_to_disk"),))
    assert after[moved_in] - before[moved_in] >= (n - h) * steps * PAGE * 0.9
    assert after[moved_out] - before[moved_out] > 0
    prefetched = sum(after[("stated_prefetch_total", (("result", r),))] for r in ("hit", "late"))
    assert prefetched > 0
    assert after[("stated_resident_bytes", (("tier", "disk"),))] > 0
    assert after[("stated_step_stall_seconds_total", ())] >= before[("stated_step_stall_seconds_total", ())]
    opt.close()


def test_two_jobs_share_the_budget(tmp_path):
    """A small job keeps all its pages resident beside a job whose state is far larger than the budget."""
    small, large = make_model(width=64), make_model(width=1024)
    budget = 4 * state_bytes(small) + 24 * PAGE
    proc = DaemonProcess(tmp_path, "--host-memory", str(budget), "--page-size", str(PAGE))
    proc.start()
    try:
        big = stated.AdamW(large.parameters(), address=proc.address, job="large")
        little = stated.AdamW(small.parameters(), address=proc.address, job="small")
        for _ in range(3):
            train(large, big, 1)
            train(small, little, 1)
        s_small, s_big = session_stats(little), session_stats(big)
        assert s_big.resident_capacity < s_big.pages, "the large job must page"
        assert s_small.resident_capacity == s_small.pages, "the small job keeps every page"
        faults = s_small.page_faults
        train(small, little, 3)
        assert session_stats(little).page_faults == faults, "a fully resident job stops faulting"
        big.close()
        little.close()
    finally:
        proc.stop()


def test_corrupt_page_is_data_loss_naming_job_and_page(tmp_path):
    """Flip one byte of a state file: the next step fails with DATA_LOSS naming the job and the page."""
    model = make_model()
    proc = DaemonProcess(tmp_path, "--host-memory", str(2 * PAGE), "--page-size", str(PAGE))
    proc.start()
    try:
        job = f"corrupt-{uuid.uuid4().hex[:6]}"
        opt = stated.AdamW(model.parameters(), address=proc.address, job=job)
        train(model, opt, 2)  # a budget of two pages keeps none resident: every page is on disk now
        path = state_path(os.path.join(proc.directory, "state"), job)
        with open(path, "r+b") as f:
            f.seek(HEADER_BYTES + 3 * align_up(PAGE) + 100)  # page 3
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0x01]))
        with pytest.raises(stated.StatedError) as caught:
            train(model, opt, 1)
        assert caught.value.code == "DATA_LOSS"
        message = str(caught.value)
        assert job in message and "page 3" in message
        # The daemon keeps serving others.
        bystander = make_model(1)
        other = stated.AdamW(bystander.parameters(), address=proc.address, job="bystander")
        train(bystander, other, 2)
        assert proc.healthy()
        other.close()
        opt.close()
    finally:
        proc.stop()


def test_unusable_state_dir_stops_the_daemon_at_start(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a regular file where the state directory should be")
    proc = DaemonProcess(tmp_path / "d", "--host-memory", str(4 * PAGE), "--state-dir", str(blocker / "state"))
    with pytest.raises(RuntimeError, match="daemon exited with 1") as caught:
        proc.start()
    assert str(blocker / "state") in str(caught.value)


def test_unwritable_state_dir_fails_at_register_naming_path_and_bytes(tmp_path):
    """The state directory disappears under a running daemon (replaced by a file): registering is
    refused with the path and the bytes needed, nothing leaks, and the daemon keeps serving."""
    proc = DaemonProcess(tmp_path / "d", "--host-memory", str(4 * PAGE), "--page-size", str(PAGE))
    proc.start()
    state_dir = os.path.join(proc.directory, "state")
    try:
        shutil.rmtree(state_dir)
        with open(state_dir, "w") as f:
            f.write("not a directory any more")
        with pytest.raises(stated.StatedError) as caught:
            stated.AdamW(make_model().parameters(), address=proc.address)
        assert caught.value.code in ("FAILED_PRECONDITION", "RESOURCE_EXHAUSTED")
        assert state_dir in str(caught.value)
        assert "bytes" in str(caught.value)
        assert proc.healthy()
        assert proc.segments() == [], "a refused registration leaves no arenas behind"
    finally:
        proc.stop()


def test_full_disk_is_resource_exhausted_at_register(tmp_path):
    """A state directory on a 1 MiB tmpfs: registering 4 MiB of state is refused, naming path and bytes."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.system(f"mount -t tmpfs -o size=1M tmpfs {mount} 2>/dev/null") != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root and mount rights)")
    try:
        proc = DaemonProcess(tmp_path / "d", "--host-memory", str(4 * PAGE), "--page-size", str(PAGE),
                             "--state-dir", str(mount / "state"))
        proc.start()
        try:
            model = torch.nn.Linear(1024, 512)  # 4 MiB of AdamW state
            with pytest.raises(stated.StatedError) as caught:
                stated.AdamW(model.parameters(), address=proc.address)
            assert caught.value.code == "RESOURCE_EXHAUSTED"
            assert str(mount / "state") in str(caught.value) and "bytes" in str(caught.value)
            small = stated.AdamW(torch.nn.Linear(16, 16).parameters(), address=proc.address)
            small.close()
        finally:
            proc.stop()
    finally:
        os.system(f"umount {mount}")
