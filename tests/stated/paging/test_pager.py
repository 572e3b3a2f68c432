"""The Pager interface: both pagers implement it, the engine alone calls it, pinning goes through it,
and a step that fails half-way gives every page it got back to the pager."""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch

from stated.backends.cpu import CpuBackend
from stated.metrics import Metrics
from stated.paging.daemon_paging import Paging
from stated.paging.disk_pager import DiskPager
from stated.paging.pager import Pager
from stated.paging.resident_pager import ResidentPager
from stated.store import Store

PAGE_BYTES = 64 << 10
SHAPES = [(96, 128), (300,), (64, 256), (7,), (128, 96)]
ROOT = pathlib.Path(__file__).resolve().parents[3] / "stated"


def test_both_pagers_implement_the_interface():
    for cls in (ResidentPager, DiskPager):
        assert issubclass(cls, Pager)
        assert not getattr(cls, "__abstractmethods__", None), f"{cls.__name__} leaves methods abstract"


def test_only_the_engine_and_paging_touch_a_sessions_pager():
    """Backends, the store and the session see bound pages only (`x.pager` appears nowhere else but in
    the engine, the paging package and the statistics of GetStats and `stated jobs`)."""
    allowed = {ROOT / "engine.py", ROOT / "server" / "servicer.py", ROOT / "server" / "stats_calls.py",
               ROOT / "server" / "job_table.py"}
    crossings = []
    for path in ROOT.rglob("*.py"):
        if path in allowed or path.parent == ROOT / "paging":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "pager":
                # The store's one line that gives a new session its pager is the exception.
                if not (path.name == "store.py" and isinstance(node.ctx, ast.Store)):
                    crossings.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}")
    assert not crossings, crossings


class Pinner:
    def __init__(self):
        self.pinned: set[int] = set()

    def pin_host(self, address: int, nbytes: int) -> None:
        self.pinned.add(address)

    def unpin_host(self, address: int) -> None:
        self.pinned.remove(address)


@pytest.mark.parametrize("budget", [False, True])
def test_pinning_covers_slots_made_before_and_after(tmp_path, budget):
    paging = Paging(Metrics(), host_memory=3 * PAGE_BYTES if budget else None, state_dir=str(tmp_path))
    store = Store(CpuBackend(), PAGE_BYTES, paging=paging)
    session = store.attach("pin", 0, "adamw", 1)
    try:
        store.register(session, [{}], [(shape, torch.float32, 0, "") for shape in SHAPES])
        store.step(session, 1, [{}], b"\1" * len(SHAPES))  # some slots exist now
        pinner = Pinner()
        paging.feed_device(session, pinner)
        before = len(pinner.pinned)
        assert before == session.pager.pool.allocated_bytes // session.pager.pool.slot_bytes > 0
        store.step(session, 2, [{}], b"\1" * len(SHAPES))
        slots = session.pager.pool.allocated_bytes // session.pager.pool.slot_bytes
        assert len(pinner.pinned) == slots >= before
    finally:
        store.detach(session)
        paging.close()
    assert not pinner.pinned, "closing the pager unpins every slot"


class FailingBackend(CpuBackend):
    """Keeps two pages in flight and fails on the fourth page of the pass."""

    def __init__(self):
        super().__init__()
        self.depth = 2
        self.seen = 0

    def run_page(self, session, page, bound, groups, pass_index, has_grad):
        self.seen += 1
        if self.seen == 4:
            raise RuntimeError("page 4 failed")
        self.update(session, bound, groups, pass_index, has_grad)
        return page  # a ticket, retired later

    def retire(self, ticket) -> bool:
        return True


@pytest.mark.parametrize("budget", [False, True])
def test_a_failed_step_gives_every_page_back(tmp_path, budget):
    paging = Paging(Metrics(), host_memory=3 * PAGE_BYTES if budget else None, state_dir=str(tmp_path))
    backend = FailingBackend()
    store = Store(backend, PAGE_BYTES, paging=paging)
    session = store.attach("fail", 0, "adamw", 1)
    try:
        store.register(session, [{}], [(shape, torch.float32, 0, "") for shape in SHAPES])
        out: dict[int, int] = {}
        pager = session.pager
        get, done = pager.get, pager.done

        def counted_get(page):
            out[page] = out.get(page, 0) + 1
            return get(page)

        def counted_done(page, dirty=True):
            out[page] -= 1
            assert out[page] >= 0, f"page {page} given back twice"
            return done(page, dirty)

        pager.get, pager.done = counted_get, counted_done
        with pytest.raises(RuntimeError, match="page 4 failed"):
            store.step(session, 1, [{}], b"\1" * len(SHAPES))
        assert out and not any(out.values()), f"pages not given back: {out}"
    finally:
        store.detach(session)
        paging.close()
