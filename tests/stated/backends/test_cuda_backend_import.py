"""The CUDA backend's module loads on a machine without CuPy, and says how to get CuPy when it is made.

A daemon imports stated.backends.cuda only when a client registers CUDA tensors; the store turns the
error raised here into FAILED_PRECONDITION for that client (tests/stated/test_device_input.py). The
error must name the `cuda` extra, so that the fix is one command.
"""

from __future__ import annotations

import builtins
import importlib
import subprocess
import sys

import pytest

from stated.errors import FailedPrecondition
from stated.metrics import Metrics


def test_module_imports_without_cupy_in_a_fresh_interpreter():
    """Importing the backend (and the daemon, which names it) loads no CuPy."""
    code = ("import sys; sys.modules['cupy'] = None\n"  # any `import cupy` now fails
            "import stated.backends.cuda as c, stated.server.daemon\n"
            "assert c.CudaBackend.name == 'cuda' and callable(c.CudaBackend.pin_host)\n"
            "print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


@pytest.fixture
def without_cupy(monkeypatch):
    real_import = builtins.__import__

    def refuse(name, *args, **kwargs):
        if name == "cupy" or name.startswith("cupy."):
            raise ModuleNotFoundError("No module named 'cupy'", name="cupy")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", refuse)
    for name in [n for n in sys.modules if n == "cupy" or n.startswith("cupy.")]:
        monkeypatch.delitem(sys.modules, name)


def test_constructing_without_cupy_names_the_cuda_extra(without_cupy):
    cuda = importlib.import_module("stated.backends.cuda")
    with pytest.raises(ImportError) as info:
        cuda.CudaBackend(1 << 20, 0, 4, Metrics())
    message = str(info.value)
    assert "pip install 'stated[cuda]'" in message, message
    assert "CuPy" in message


def test_the_store_turns_it_into_a_sentence_for_the_client(without_cupy):
    """The daemon's factory raises ImportError; the store's handler reports it (and keeps serving)."""
    from stated.errors import FailedPrecondition
    from stated.store import Store
    from stated.backends.cpu import CpuBackend

    cuda = importlib.import_module("stated.backends.cuda")
    store = Store(CpuBackend(), 1 << 20, cuda_backend=lambda: cuda.CudaBackend(1 << 20, 0, 4, Metrics()))
    session = store.attach("job", 0, "adamw", 1)
    with pytest.raises(FailedPrecondition, match=r"stated\[cuda\]"):
        store.register(session, [{}], [((4,), __import__("torch").float32, 0, "")],
                       device="8a2f0c3e-1b4d-4e5f-9a6b-7c8d9e0f1a2b")
    store.close_all()


@pytest.mark.parametrize("given,expected", [
    (bytes(range(16)), "000102030405060708090a0b0c0d0e0f"),
    ("GPU-8A2F0C3E-1b4d-4e5f-9a6b-7c8d9e0f1a2b", "8a2f0c3e1b4d4e5f9a6b7c8d9e0f1a2b"),
    ("8a2f0c3e-1b4d-4e5f-9a6b-7c8d9e0f1a2b", "8a2f0c3e1b4d4e5f9a6b7c8d9e0f1a2b"),
])
def test_device_uuids_compare_in_one_spelling(given, expected):
    cuda = importlib.import_module("stated.backends.cuda")
    assert cuda.uuid_key(given) == expected


# --- the backend's page pipeline on a stand-in device ----------------------------------------------
#
# tests/gpu/fake_cupy.py stands in for CuPy and the kernel runner on the host (copies at once, launches
# run the CPU update on the buffers they name). A CUDA session and a CPU session of the same store get
# the same parameters and gradients; the CUDA backend's bookkeeping (staging ring, GPU cache with
# write-back, buffer swaps, master weights filled on the "device", flush before export, invalidate
# before import, pager.get/done pairs) must give the CPU backend's bits. Stream ordering is what this
# cannot check: the GPU tests (tests/gpu) do, on a GPU.

import os  # noqa: E402

import torch  # noqa: E402

from support.imports import import_from  # noqa: E402

DEVICE = "00010203-0405-0607-0809-0a0b0c0d0e0f"  # fake_cupy.UUID as torch spells it
SHAPES = [(64, 48), (48,), (300,), (48, 64), (7,), (1000,)]
GROUPS = [{"lr": 1e-2, "weight_decay": 0.1}, {"lr": 3e-3, "weight_decay": 0.0}]
PAGE = 8192  # AdamW fp32: 1024 elements a page, so the model spans 10 pages


@pytest.fixture
def fake_cuda(monkeypatch):
    fake_cupy = import_from("tests/gpu", "fake_cupy")
    cp = fake_cupy.make_cupy()
    monkeypatch.setitem(sys.modules, "cupy", cp)
    stale = ("stated.backends.cuda_memory", "stated.backends.cuda_launches", "stated.backends.cuda_pages")
    for name in stale:
        monkeypatch.delitem(sys.modules, name, raising=False)
    fake_cupy.patch_runner(monkeypatch)
    yield cp
    for name in stale:  # bound to the stand-in: never reuse them
        sys.modules.pop(name, None)


class Client:
    """One session of the store as a client would drive it: parameter and gradient views, steps."""

    def __init__(self, store, job, device, dtype, master, values, algorithm="adamw"):
        self.store = store
        self.session = s = store.attach(job, 0, algorithm, os.getpid(), master)
        tensors = [(shape, dtype, i % 2, "") for i, shape in enumerate(SHAPES)]
        region, _, _, _ = store.register(s, [{}, {}], tensors, device)
        if device:
            self.arenas = [torch.zeros(region.arena_bytes, dtype=torch.uint8) for _ in range(2)]
            handles = [a.data_ptr().to_bytes(8, "little") + bytes(56) for a in self.arenas]
            with pytest.raises(FailedPrecondition, match="region 0"):  # no step before the buffers are shared
                store.step(s, 1, GROUPS, b"\1" * len(SHAPES))
            store.share_device_buffers(s, 0, "GPU-" + device, (handles[0], 0, region.arena_bytes),
                                       (handles[1], 0, region.arena_bytes))
            self.params, self.grads = [], []
            for place in s.tensors:
                span = slice(place.offset_bytes, place.offset_bytes + place.info.numel * dtype.itemsize)
                self.params.append(self.arenas[0][span].view(dtype))
                self.grads.append(self.arenas[1][span].view(dtype))
        else:
            self.params, self.grads = s.param_views, s.grad_views
        for view, value in zip(self.params, values):
            view.copy_(value.reshape(-1))
        self.steps = 0
        self.outstanding: dict[int, int] = {}
        pager = s.pager
        get, done = pager.get, pager.done

        def counted_get(page):
            self.outstanding[page] = self.outstanding.get(page, 0) + 1
            return get(page)

        def counted_done(page, dirty=True):
            self.outstanding[page] -= 1
            assert self.outstanding[page] >= 0, f"page {page} handed back more often than fetched"
            return done(page, dirty)

        pager.get, pager.done = counted_get, counted_done

    def step(self, grads, skip=(), grad_scale=0.0, max_grad_norm=0.0):
        for i, (view, g) in enumerate(zip(self.grads, grads)):
            view.copy_(g.reshape(-1))
        has_grad = bytes(0 if i in skip else 1 for i in range(len(SHAPES)))
        self.steps += 1
        result = self.store.step(self.session, self.steps, GROUPS, has_grad, grad_scale, max_grad_norm)
        assert not any(self.outstanding.values()), f"pages not handed back: {self.outstanding}"
        return result

    def state(self):
        self.store.begin_export(self.session)
        entries = {i: self.store.export_tensor(self.session, i) for i in range(len(SHAPES))}
        assert not any(self.outstanding.values())
        return entries


def inputs(steps, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    values = [(torch.randn(s, generator=g) * 0.1).to(dtype) for s in SHAPES]
    grads = [[(torch.randn(s, generator=g) * 1e-2).to(dtype) for s in SHAPES] for _ in range(steps)]
    return values, grads


def make_store(fake_cuda, tmp_path, cache_pages=0, staging=3, host_memory=None):
    from stated.backends.cpu import CpuBackend
    from stated.paging.daemon_paging import Paging
    from stated.store import Store

    metrics = Metrics()
    cuda = importlib.import_module("stated.backends.cuda")
    paging = Paging(metrics, host_memory=host_memory, state_dir=str(tmp_path))
    store = Store(CpuBackend(), PAGE, paging=paging,
                  cuda_backend=lambda: cuda.CudaBackend(PAGE, cache_pages * PAGE, staging, metrics))
    return store, metrics


def assert_same(a: Client, b: Client) -> None:
    for i, (p, q) in enumerate(zip(a.params, b.params)):
        assert torch.equal(p, q), f"parameter {i}"
    sa, sb = a.state(), b.state()
    for i in sb:
        assert (sa[i] is None) == (sb[i] is None), i
        for key, value in (sb[i] or {}).items():
            assert torch.equal(sa[i][key], value), (i, key)


def sample(metrics, name, label):
    return getattr(metrics, name).labels(label)._value.get()


@pytest.mark.parametrize("cache_pages", [0, 3, 100], ids=["streaming", "small-cache", "whole-cache"])
@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True)], ids=["fp32", "bf16-master"])
def test_pipeline_gives_the_cpu_backends_bits(fake_cuda, tmp_path, cache_pages, dtype, master):
    store, metrics = make_store(fake_cuda, tmp_path, cache_pages)
    values, grads = inputs(9, dtype)
    cpu = Client(store, "cpu", "", dtype, master, values)
    gpu = Client(store, "gpu", DEVICE, dtype, master, values)
    pages = len(gpu.session.table)
    assert pages >= 8
    skips = {2: {1, 3}, 5: {0}}
    for step, step_grads in enumerate(grads):
        if step == 6:
            assert_same(gpu, cpu)  # a flush in the middle (cached pages written back) changes nothing
        cpu.step(step_grads, skips.get(step, ()))
        gpu.step(step_grads, skips.get(step, ()))
    assert_same(gpu, cpu)
    assert not gpu.session.master_pending
    moved_in = sample(metrics, "transfer_bytes", "host_to_gpu")
    moved_out = sample(metrics, "transfer_bytes", "gpu_to_host")
    state = gpu.session.page_bytes_held
    # A copy moves a page's extent (up to its last field's end), the tier counts its state bytes.
    extent = sum(e.page.extent for e in gpu.session.table)
    if cache_pages == 0:
        assert moved_in == moved_out >= 8 * extent  # every page in and out, every step (two were masked)
        assert sample(metrics, "page_evictions", "gpu") == 0
    elif cache_pages >= pages:
        assert moved_in == extent  # once, at the first step
        assert moved_out == 2 * extent  # the two flushes (assert_same exports)
        assert sample(metrics, "resident_bytes", "gpu") == state
    else:
        assert sample(metrics, "page_evictions", "gpu") > 0
        assert extent < moved_in < 9 * extent
    assert fake_cuda.cuda.runtime.registered, "host pages must be page-locked for the GPU"
    store.close_all()
    assert not fake_cuda.cuda.runtime.opened, "IPC mappings left open"
    assert not fake_cuda.cuda.runtime.registered, "host pages left page-locked"


def test_a_host_budget_under_the_gpu_cache(fake_cuda, tmp_path):
    """--host-memory smaller than the state: host pages come and go from the state file while the GPU
    cache holds some of them. The session's share is 7 of its 10 pages, 3 of them staging slots
    (Note [slots of a session] in stated.paging.disk_pager); the CUDA backend keeps up to `staging_pages`
    host pages out at once, and the pager's staging covers that plus one. Also the case where reads
    ahead once overtook a write-back (stated.paging.disk_pager._prefetch)."""
    store, _ = make_store(fake_cuda, tmp_path, cache_pages=3, staging=2, host_memory=7 * PAGE)
    reference, _ = make_store(fake_cuda, tmp_path / "reference")
    values, grads = inputs(6, torch.float32)
    cpu = Client(reference, "cpu", "", torch.float32, False, values)
    gpu = Client(store, "gpu", DEVICE, torch.float32, False, values)
    for step_grads in grads:
        cpu.step(step_grads)
        gpu.step(step_grads)
    assert_same(gpu, cpu)
    store.close_all()
    reference.close_all()


@pytest.mark.parametrize("masters", ["none", "every", "some"])
def test_import_drops_device_copies(fake_cuda, tmp_path, masters):
    """The CPU session's state replaces the GPU session's (whose history differs). Master weights the
    import brings are kept: the device must not refill them from the bf16 parameters at the next step (it
    did: every page was left marked for a refill). Entries without one ("none"; the odd tensors with
    "some") get theirs from the parameters again, on the "device" at the next step, as on the CPU."""
    store, _ = make_store(fake_cuda, tmp_path, cache_pages=4)
    values, grads = inputs(8, torch.bfloat16, seed=2)
    cpu = Client(store, "cpu", "", torch.bfloat16, True, values)
    gpu = Client(store, "gpu", DEVICE, torch.bfloat16, True, values)
    for step_grads in grads[:4]:
        cpu.step(step_grads)
        gpu.step([g * 3 for g in step_grads])  # a different history, which the import replaces
    keep = {"none": lambda i: False, "every": lambda i: True, "some": lambda i: i % 2 == 0}[masters]
    exported = [(i, {k: v for k, v in e.items() if k != "master_param" or keep(i)}) for i, e in cpu.state().items() if e]
    for p, q in zip(gpu.params, cpu.params):
        p.copy_(q)
    store.import_state(gpu.session, exported)
    store.import_state(cpu.session, exported)  # the same path on the CPU backend
    for step_grads in grads[4:]:
        cpu.step(step_grads)
        gpu.step(step_grads)
    assert_same(gpu, cpu)
    store.close_all()


def test_grad_scale_and_clipping(fake_cuda, tmp_path):
    """The multiplier reaches every launch; norms come from float64 sums (the CPU backend's from fp32
    norms), so the runs agree to rounding."""
    store, _ = make_store(fake_cuda, tmp_path, cache_pages=2)
    values, grads = inputs(6, torch.float32, seed=3)
    cpu = Client(store, "cpu", "", torch.float32, False, values)
    gpu = Client(store, "gpu", DEVICE, torch.float32, False, values)
    for step, step_grads in enumerate(grads):
        scaled = [g * 1024 for g in step_grads]
        if step == 3:
            scaled[2][0] = float("inf")
        a = cpu.step(scaled, grad_scale=1024.0, max_grad_norm=0.05)
        b = gpu.step(scaled, grad_scale=1024.0, max_grad_norm=0.05)
        assert a.found_inf == b.found_inf == (step == 3)
        if not a.found_inf:
            assert b.grad_norm == pytest.approx(a.grad_norm, rel=1e-6)
            assert a.grad_norm > 0.05  # clipping bites
    for i, (p, q) in enumerate(zip(gpu.params, cpu.params)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-8, msg=lambda m: f"parameter {i}: {m}")
    store.close_all()


def test_sessions_share_the_cache_and_give_everything_back(fake_cuda, tmp_path):
    store, metrics = make_store(fake_cuda, tmp_path, cache_pages=6)
    values, grads = inputs(4, torch.float32, seed=4)
    first = Client(store, "first", DEVICE, torch.float32, False, values)
    first.step(grads[0])
    backend = first.session.backend
    pool = next(iter(backend._devices.values())).cache
    assert pool.in_use == 6  # alone, it takes the whole cache
    second = Client(store, "second", DEVICE, torch.float32, False, values)
    reference = Client(store, "reference", "", torch.float32, False, values)
    for step_grads in grads:
        second.step(step_grads)
        reference.step(step_grads)
        assert pool.in_use <= 6
    first.step(grads[1])  # its share is now half: it wrote back and gave up three slots
    assert len(backend._states[first.session.id].cached) == 3
    assert_same(second, reference)
    store.detach(first.session)
    store.detach(second.session)
    assert pool.in_use == 0 and len(backend.handles) == 0
    assert sample(metrics, "resident_bytes", "gpu") == 0
    store.close_all()


def test_bad_device_input_is_refused_by_name(fake_cuda, tmp_path):
    from stated.errors import InvalidArgument

    store, _ = make_store(fake_cuda, tmp_path)
    s = store.attach("bad", 0, "adamw", os.getpid())
    region, _, _, _ = store.register(s, [{}], [((16,), torch.float32, 0, "")], DEVICE)
    good = torch.zeros(region.arena_bytes, dtype=torch.uint8)
    handle = good.data_ptr().to_bytes(8, "little") + bytes(56)
    with pytest.raises(InvalidArgument, match="params.handle cannot be opened"):
        store.share_device_buffers(s, 0, DEVICE, (bytes(64), 0, region.arena_bytes), (handle, 0, region.arena_bytes))
    assert not fake_cuda.cuda.runtime.opened  # nothing stays open after a refusal
    store.share_device_buffers(s, 0, DEVICE, (handle, 0, region.arena_bytes), (handle, 0, region.arena_bytes))
    assert len(s.backend.handles) == 1  # one block holding both buffers is opened once
    with pytest.raises(InvalidArgument, match="already has device buffers"):
        store.share_device_buffers(s, 0, DEVICE, (handle, 0, region.arena_bytes), (handle, 0, region.arena_bytes))
    other = store.attach("other", 0, "adamw", os.getpid())
    store.register(other, [{}], [((16,), torch.float32, 0, "")], "ffffffff-0405-0607-0809-0a0b0c0d0e0f")
    with pytest.raises(InvalidArgument, match="not a CUDA device this daemon can see"):
        store.share_device_buffers(other, 0, "ffffffff-0405-0607-0809-0a0b0c0d0e0f",
                                   (handle, 0, region.arena_bytes), (handle, 0, region.arena_bytes))
    store.close_all()
    assert not fake_cuda.cuda.runtime.opened
