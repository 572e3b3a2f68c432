"""The CPU worker threads (Note [dynamic CPU scheduling] in stated.backends.cpu_workers).

Pieces must cover every element once, keep 8-bit blocks whole, and change no bit of any result: a
store whose CPU backend hands pages to worker threads in pieces steps exactly as one that runs torch's
kernels on whole pages, for every algorithm that allows it, with master weights, skipped tensors and
state paged through files. Errors in a piece reach the step, and the threads go on working.
"""

from __future__ import annotations

import threading

import pytest
import torch

from stated.backends.cpu import CpuBackend
from stated.backends.cpu_workers import CpuWorkers, cut, piece_sizes
from stated.errors import FailedPrecondition
from stated.metrics import Metrics
from stated.paging.daemon_paging import Paging
from stated.store import Store
from stated_kernels.spec import Segment, TensorInfo
from support.stepping import step_store

PAGE_BYTES = 64 << 10
SHAPES = [(96, 128), (300,), (64, 256), (7,), (128, 96), (1000, 33)]
# Small pieces, so that 64 KiB pages are cut into several (the daemon's are about a million elements).
LARGEST, SMALLEST = 1536, 256


@pytest.fixture(scope="module")
def workers():
    pool = CpuWorkers(2, largest=LARGEST, smallest=SMALLEST)
    yield pool
    pool.close()


@pytest.mark.parametrize("total,block", [(1, 1), (255, 1), (10_000, 1), (1 << 20, 1), (10_000, 256), (3 * 256 + 5, 256)])
def test_piece_sizes_add_up_and_shrink(total, block):
    sizes = piece_sizes(total, block, LARGEST, SMALLEST)
    assert sum(sizes) == total
    assert all(size % block == 0 for size in sizes[:-1])
    assert sizes[:-1] == sorted(sizes[:-1], reverse=True) and sizes[-1] <= max(SMALLEST, block)
    assert max(sizes) <= max(LARGEST, block)


def fake_segments(lengths: list[int], block: int) -> list[Segment]:
    """Segments over a numbered buffer, with an elementwise field and a one-per-block field."""
    segments, offset = [], 0
    for index, length in enumerate(lengths):
        numbers = torch.arange(offset, offset + length, dtype=torch.float64)
        scale = torch.arange(-(-length // block), dtype=torch.float64) + 1000 * index
        info = TensorInfo(index, (length,), torch.float32, 0)
        segments.append(Segment(info, 0, numbers, numbers.clone(), {"m": numbers.clone(), "m_scale": scale}, {}))
        offset += length
    return segments


@pytest.mark.parametrize("block", [1, 256])
@pytest.mark.parametrize("lengths", [[5000], [7, 300, 12_288, 1, 2000], [256 * 9, 256 * 3 + 17], [100] * 40])
def test_cut_covers_every_element_once_and_keeps_blocks(lengths, block):
    segments = fake_segments(lengths, block)
    pieces = cut(segments, block, LARGEST, SMALLEST)
    seen = torch.cat([s.param for piece in pieces for s in piece])
    assert torch.equal(seen, torch.cat([s.param for s in segments]))
    for piece in pieces:
        for s in piece:
            assert s.start % block == 0  # a slice starts on a block boundary of its tensor
            assert torch.equal(s.grad, s.param) and torch.equal(s.fields["m"], s.param)
            first = segments[s.tensor.index].fields["m_scale"]
            assert torch.equal(s.fields["m_scale"], first[s.start // block: -(-(s.start + s.length) // block)])
    assert len(pieces) > 1 or sum(lengths) <= LARGEST


CASES = [
    ("adamw", {"lr": 1e-2, "weight_decay": 0.1}),
    ("adam", {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True}),
    ("sgd", {"lr": 1e-2, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}),
    ("lion", {"lr": 1e-3, "weight_decay": 0.1}),
    ("slimadam", {"lr": 1e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1}),
    ("adamw8bit", {"lr": 1e-3}),
]


def run(backend: CpuBackend, paging: Paging, algorithm: str, hp: dict, master: bool):
    params, state, _ = step_store(Store(backend, PAGE_BYTES, paging=paging), algorithm, hp, SHAPES, master,
                                  steps=5, name="layers.{}.mlp.c_fc.weight")
    return params, state


@pytest.mark.parametrize("algorithm,hp", CASES)
@pytest.mark.parametrize("master", [False, True])
def test_pieces_change_no_bit(workers, algorithm, hp, master):
    reference = run(CpuBackend(), Paging(Metrics()), algorithm, hp, master)
    pooled = run(CpuBackend(workers), Paging(Metrics()), algorithm, hp, master)
    assert_identical(reference, pooled)


@pytest.mark.parametrize("algorithm,hp", CASES[:1] + CASES[-1:])
def test_pieces_with_state_paged_through_files(tmp_path, workers, algorithm, hp):
    reference = run(CpuBackend(), Paging(Metrics()), algorithm, hp, False)
    paging = Paging(Metrics(), host_memory=5 * PAGE_BYTES, state_dir=str(tmp_path), prefetch_depth=2)
    assert_identical(reference, run(CpuBackend(workers), paging, algorithm, hp, False))


def assert_identical(reference, candidate) -> None:
    (ref_params, ref_state), (params, state) = reference, candidate
    for a, b in zip(ref_params, params):
        assert torch.equal(a, b)
    for a, b in zip(ref_state, state):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_an_error_in_a_piece_reaches_the_step_and_the_threads_go_on(workers, monkeypatch):
    store = Store(CpuBackend(workers), PAGE_BYTES, paging=Paging(Metrics()))
    session = store.attach("errors", 0, "sgd", 1)
    hp = {"lr": 0.1, "momentum": 0.0}
    real_update = type(session.algorithm).update
    ran = []

    def failing_update(self, segments, hp, pass_index=0):
        ran.append(threading.current_thread().name)
        if failing and any(s.start >= 20_000 for s in segments):
            raise RuntimeError("a piece failed")
        real_update(self, segments, hp, pass_index)

    monkeypatch.setattr(type(session.algorithm), "update", failing_update)
    try:
        store.register(session, [hp], [((4096, 8), torch.float32, 0, "w")])
        session.grad_views[0].fill_(1.0)
        failing = True
        with pytest.raises(RuntimeError, match="a piece failed"):
            store.step(session, 1, [hp], b"\x01")
        assert all(name.startswith("stated-cpu-") for name in ran)  # the pieces ran on the workers
        failing = False
        # The failed step left the session inconsistent (Note [half-applied steps]): the retry is refused
        # until the state is replaced; then the same step number runs, on the same threads.
        with pytest.raises(FailedPrecondition, match="step 1 failed"):
            store.step(session, 1, [hp], b"\x01")
        store.import_state(session, [])
        before = session.param_views[0].clone()
        store.step(session, 1, [hp], b"\x01")  # the failed step was not counted
        assert torch.equal(session.param_views[0], before - 0.1)
    finally:
        store.detach(session)
        store.paging.close()


def test_openmp_threads_of_other_threads_are_left_alone():
    default = torch.get_num_threads()
    pool = CpuWorkers(2)
    try:
        seen = []
        thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert torch.get_num_threads() == default
        assert seen == [default]
        inside = pool.submit([lambda: seen.append(torch.get_num_threads())] * 2)
        inside.wait()
        assert seen[1:] == [1, 1]
    finally:
        pool.close()


def test_bad_thread_count_is_refused():
    with pytest.raises(ValueError, match="at least 1, got 0"):
        CpuWorkers(0)
