"""The engine's pipeline logic on CPU (DESIGN.md: "the pipeline logic is tested on CPU").

`DeferredBackend` behaves as a device backend does: each page is staged into a buffer of its own, the
update runs there, and the result reaches the host page only when the engine retires the ticket, with up
to `depth` pages in flight. Its steps must equal the CPU backend's bit for bit, with everything resident
and with a host budget that pages state through state files (where Note [pages in flight] in
stated.paging.disk_pager matters), for a one-pass and a two-pass algorithm, with master weights and with
tensors that skip a step.
"""

from __future__ import annotations

import pytest
import torch

from stated.backends.cpu import CpuBackend
from stated.metrics import Metrics
from stated.paging.daemon_paging import Paging
from stated.store import Store
from support.stepping import step_store

PAGE_BYTES = 64 << 10
SHAPES = [(96, 128), (300,), (64, 256), (7,), (128, 96)]


class DeferredBackend(CpuBackend):
    name = "deferred"

    def __init__(self, depth: int):
        self.depth = depth
        self.in_flight = 0
        self.most_in_flight = 0

    def run_page(self, session, page, bound, groups, pass_index, has_grad):
        host = bound.buffer
        staged = host.clone()  # the "device" copy
        self.update(session, session.bind(session.table[page], staged), groups, pass_index, has_grad)
        session.forget_binding(page)  # bound to the staged copy, which goes away at retire
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        return staged, host

    def retire(self, ticket) -> bool:
        staged, host = ticket
        host.copy_(staged)  # the "copy back": the host buffer stays the page's until the engine's done()
        self.in_flight -= 1
        return True


def run(backend, paging, algorithm: str, hp: dict, master: bool):
    return step_store(Store(backend, PAGE_BYTES, paging=paging), algorithm, hp, SHAPES, master)


def budgeted(tmp_path, pages: int) -> Paging:
    return Paging(Metrics(), host_memory=pages * PAGE_BYTES, state_dir=str(tmp_path), prefetch_depth=2)


@pytest.mark.parametrize("algorithm,hp", [("adamw", {"lr": 1e-2, "weight_decay": 0.1}), ("came", {"lr": 1e-3})])
@pytest.mark.parametrize("master", [False, True])
@pytest.mark.parametrize("paged", [False, True])
def test_pages_in_flight_change_nothing(tmp_path, algorithm, hp, master, paged):
    reference = run(CpuBackend(), Paging(Metrics()), algorithm, hp, master)
    deferred = DeferredBackend(depth=3)
    paging = budgeted(tmp_path, pages=3) if paged else Paging(Metrics())
    params, state, faults = run(deferred, paging, algorithm, hp, master)
    assert deferred.most_in_flight == 3 and deferred.in_flight == 0
    if paged:
        assert faults > 0, "the budget must force paging"
    for i, (ours, ref) in enumerate(zip(params, reference[0])):
        assert torch.equal(ours, ref), f"parameter {i}"
    for i, (ours, ref) in enumerate(zip(state, reference[1])):
        assert ours.keys() == ref.keys()
        for key in ref:
            assert torch.equal(ours[key], ref[key]), f"state[{i}][{key!r}]"


def test_prefetch_never_overtakes_a_write_back(tmp_path):
    """Regression: with room for 7 of 8 pages, reads ahead were planned for a page that the access in
    progress was about to evict, before its write-back was queued, and read a page never written."""
    store = Store(CpuBackend(), PAGE_BYTES, paging=Paging(Metrics(), host_memory=7 * PAGE_BYTES, state_dir=str(tmp_path)))
    session = store.attach("overtake", 0, "adamw", 1)
    shapes = [(512, 48), (48,), (2400,), (48, 512), (7,), (8000,)]
    groups = [{"lr": 1e-2, "weight_decay": 0.1}, {"lr": 3e-3, "weight_decay": 0.0}]
    try:
        store.register(session, groups, [(shape, torch.float32, i % 2, "") for i, shape in enumerate(shapes)])
        for number in range(1, 5):
            for view in session.grad_views:
                view.normal_()
            store.step(session, number, groups, b"\1" * len(shapes))
        assert session.pager.faults > 0
    finally:
        store.detach(session)
        store.paging.close()
