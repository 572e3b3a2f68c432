"""A failed step never half-applies unnoticed (Note [half-applied steps] in stated.inconsistency).

The store in process with real state files: a page that fails its checksum or an I/O error (EIO,
injected at the state file's transfer with monkeypatch: this machine has no device-mapper to make a
failing device, and a loop device cannot fail on demand without one), and a kernel that fails. Each time:
the session is inconsistent, the step counters are as before the step, no page slot stays taken, steps
and state_dict are refused naming the step, the page and the way back, and load_state_dict makes the
session consistent again. Refusals by validation before anything was touched change nothing.
"""

from __future__ import annotations

import errno
import os

import pytest
import torch

from stated.backends.cpu import CpuBackend
from stated.errors import DataLoss, FailedPrecondition, InvalidArgument
from stated.metrics import Metrics
from stated.paging.daemon_paging import Paging
from stated.paging.state_file import HEADER_BYTES, PageIOError, StateFile
from stated.store import Store
from stated_kernels import ALGORITHMS

PAGE = 64 << 10
SHAPES = [(96, 128), (300,), (64, 256), (7,), (128, 96)]  # 8 pages of AdamW state
HP = {"lr": 1e-2}
SLIMADAM = {"beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1}  # required, no defaults


@pytest.fixture
def paged(tmp_path):
    """A store whose host budget holds two pages: every page of the session streams from its file."""
    store = Store(CpuBackend(), PAGE, paging=Paging(Metrics(), host_memory=2 * PAGE, state_dir=str(tmp_path)))
    session = store.attach("broken", 0, "adamw", 1)
    store.register(session, [HP], [(shape, torch.float32, 0, f"w{i}") for i, shape in enumerate(SHAPES)])
    for view in session.param_views:
        view.copy_(torch.randn(view.shape, generator=torch.Generator().manual_seed(0)))
    yield store, session
    store.detach(session)
    store.paging.close()


def step(store, session, number: int, has_grad: bytes | None = None, **kw):
    for i, view in enumerate(session.grad_views):
        view.copy_(torch.randn(view.shape, generator=torch.Generator().manual_seed(number * 10 + i)) * 1e-2)
    return store.step(session, number, [HP], has_grad or b"\1" * len(session.tensors), **kw)


def flip_byte(session, page: int) -> None:
    pager = session.pager
    with open(pager.file.path, "r+b") as f:
        f.seek(HEADER_BYTES + pager.file_pages[page] * pager.file.slot_bytes + 100)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))


def slots_astray(pager) -> int:
    """Page slots taken that hold neither a resident page nor a read ahead, nor wait, free, in the pager."""
    assert not pager._transient and not pager._in_use
    return pager.pool.in_use - len(pager._free) - pager.resident_pages - len(pager._reading)


def assert_refused(store, session, failed: int, page: int | None) -> None:
    where = f"step {failed} failed" + (f" at page {page}" if page is not None else "")
    for action in (lambda: step(store, session, failed), lambda: store.begin_export(session)):
        with pytest.raises(FailedPrecondition) as caught:
            action()
        message = str(caught.value)
        assert where in message and "half-applied" in message and "load_state_dict()" in message, message
        assert f"saved before step {failed}" in message


def test_a_flipped_byte_mid_step_leaves_the_session_inconsistent_until_restored(paged):
    store, session = paged
    for number in (1, 2):
        step(store, session, number)
    counters = session.step_counters().clone()
    flip_byte(session, 3)
    with pytest.raises(DataLoss, match="page 3 of job 'broken' is corrupt"):
        step(store, session, 3)
    assert session.steps == 2
    assert torch.equal(session.step_counters(), counters), "the failed step advanced the step counters"
    assert session.inconsistent.page == 3 and session.inconsistent.step == 3
    assert slots_astray(session.pager) == 0, "the failed read kept its page slot"
    assert_refused(store, session, 3, 3)

    store.import_state(session, [])  # back to fresh state: consistent again, nothing refused
    assert session.inconsistent is None
    for number in range(3, 9):
        step(store, session, number)
    assert slots_astray(session.pager) == 0
    store.begin_export(session)
    assert float(store.export_tensor(session, 0)["step"]) == 6.0  # counted from the fresh state


@pytest.mark.parametrize("write", [False, True])
def test_an_io_error_mid_step_is_data_loss_naming_the_page(paged, monkeypatch, write):
    """EIO from the device on a page's read (at its fault) or write (its write-back, reported at the
    end of the pass, when no one page is in hand)."""
    store, session = paged
    step(store, session, 1)
    counters = session.step_counters().clone()
    real = StateFile._transfer
    broken = session.pager.file_pages[4]

    def failing(self, page, arr, is_write):
        if page == broken and is_write == write:
            raise OSError(errno.EIO, "Input/output error")
        return real(self, page, arr, is_write)

    monkeypatch.setattr(StateFile, "_transfer", failing)
    verb = "writing" if write else "reading"
    with pytest.raises(PageIOError, match=f"{verb} page {broken} of job 'broken' .* failed: Input/output error"):
        step(store, session, 2)
    assert torch.equal(session.step_counters(), counters)
    assert slots_astray(session.pager) == 0
    assert_refused(store, session, 2, None if write else 4)

    monkeypatch.setattr(StateFile, "_transfer", real)  # the device works again
    store.import_state(session, [])
    for number in (2, 3, 4):
        step(store, session, number)
    assert slots_astray(session.pager) == 0


class FailingBackend(CpuBackend):
    """Fails on the second page of the step's first pass, after one page was updated."""

    def __init__(self):
        super().__init__()
        self.pages = 0
        self.failing = True

    def run_page(self, session, page, bound, groups, pass_index, has_grad):
        self.pages += 1
        if self.failing and self.pages == 2:
            raise RuntimeError("a kernel failed")
        return super().run_page(session, page, bound, groups, pass_index, has_grad)


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_every_algorithms_step_counters_stay_put_on_a_failed_step(algorithm):
    """Also those whose begin_step or prepass is their own (Adafactor, CAME, SlimAdam)."""
    backend = FailingBackend()
    store = Store(backend, PAGE, paging=Paging(Metrics()))
    session = store.attach("counters", 0, algorithm, 1)
    hp = {"lr": 1e-3, **(SLIMADAM if algorithm == "slimadam" else {})}
    try:
        store.register(session, [hp], [(shape, torch.float32, 0, f"layers.{i}.weight")
                                       for i, shape in enumerate(SHAPES)])
        for view in session.grad_views:
            view.fill_(0.01)
        backend.failing = False
        store.step(session, 1, [hp], b"\1\0\1\1\1")
        counters = session.step_counters().clone()
        backend.failing, backend.pages = True, 0
        with pytest.raises(RuntimeError, match="a kernel failed"):
            store.step(session, 2, [hp], b"\1" * len(SHAPES))
        assert torch.equal(session.step_counters(), counters)
        assert session.inconsistent.page is not None
        with pytest.raises(FailedPrecondition, match="INTERNAL: RuntimeError: a kernel failed"):
            store.step(session, 2, [hp], b"\1" * len(SHAPES))
    finally:
        store.detach(session)
        store.paging.close()


def test_refusals_before_anything_was_touched_leave_the_session_consistent(paged):
    store, session = paged
    step(store, session, 1)
    with pytest.raises(InvalidArgument, match="step is 5"):
        step(store, session, 5)
    with pytest.raises(InvalidArgument):
        store.step(session, 2, [{"lr": -1.0}], b"\1" * len(SHAPES))
    session.grad_views[0][0] = float("inf")
    assert store.step(session, 2, [HP], b"\1" * len(SHAPES), grad_scale=1024.0).found_inf
    assert session.inconsistent is None
    step(store, session, 3)
    store.begin_export(session)


def test_a_load_that_fails_half_way_is_inconsistent_and_a_good_one_repairs_it(paged, monkeypatch):
    store, session = paged
    step(store, session, 1)
    store.begin_export(session)
    saved = [(i, store.export_tensor(session, i)) for i in range(len(session.tensors))]
    calls = []
    real = Store._write_fields

    def failing(self, session, index, flat):
        calls.append(index)
        if len(calls) == 3:
            raise OSError(errno.EIO, "Input/output error")
        return real(self, session, index, flat)

    monkeypatch.setattr(Store, "_write_fields", failing)
    with pytest.raises(OSError):
        store.import_state(session, saved)
    assert session.inconsistent.what == "load_state_dict"
    with pytest.raises(FailedPrecondition, match="load_state_dict failed"):
        step(store, session, 2)
    monkeypatch.setattr(Store, "_write_fields", real)
    store.import_state(session, saved)
    assert session.inconsistent is None
    step(store, session, 2)
