"""The CUDA backend: the stated kernels run on the trainer's GPU, over parameter and gradient buffers the
trainer shares through CUDA IPC, with optimizer state streamed from pinned host pages.

This module imports without CuPy: the daemon loads it only when a client registers CUDA tensors, and
`CudaBackend(...)` then imports CuPy (and raises ImportError naming the `cuda` extra where it is
missing). CuPy is imported here and in the cuda_*.py modules beside it, nowhere else in `stated`.

What lives where (DESIGN.md "Pages, tiers, eviction, prefetch"):

- the trainer's buffers: one parameter and one gradient buffer per region, in the trainer's memory,
  opened once at ShareDeviceBuffers (stated.backends.cuda_memory, Note [IPC handles are opened once]);
- small state (per-tensor statistics and scratch): resident on the device for the session's life, with
  step counters kept on the host, as the CPU backend counts them;
- pages: in the host tier (page-locked: this backend is the host pools' `Pinner`), copied through a
  ring of staging buffers every step, or kept in the GPU cache (stated.backends.cuda_pages).

A step, in the engine's order (stated.backends.base): `check_gradients` (one small device-to-host
read when clipping or a loss scale asks for the norm), `begin_step` (step counts on the host, the
tensor table with this step's scalars and gradient multiplier, the pre-pass kernels), `run_page` and
`retire` per page, `between_passes`, `end_step` (waits for the kernel stream: the daemon answers Step
only once the parameters are written). No call synchronises the whole device.

Note [staging per session]: each session has its own streams and its own ring of `staging_pages`
buffers, made at its first step. Sessions on one GPU step concurrently (the server runs them on
several threads) without sharing a buffer, so no session ever waits for another's ring, and a session
whose step failed half-way cannot stall the others. The daemon's GPU memory is therefore staging per
stepping session, plus the GPU cache (one pool per GPU, shared), plus small state: it does not grow
with the model.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from typing import Any

from stated.backends.base import Backend, GradientCheck
from stated.errors import InvalidArgument
from stated_kernels.spec import Hyperparameters

log = logging.getLogger("stated.cuda")

INSTALL_HINT = "pip install 'stated[cuda]' (a CUDA 12 driver; 'stated[cuda13]' for a CUDA 13 one, as nvidia-smi shows)"


def load_cupy():
    """CuPy, or ImportError with the one command that installs it."""
    try:
        import cupy
    except ImportError as exc:
        raise ImportError(f"CUDA parameters need CuPy, which is not installed where the daemon runs ({exc}); "
                          f"install it with: {INSTALL_HINT}") from exc
    return cupy


def uuid_key(uuid: bytes | str) -> str:
    """A device UUID as 32 lowercase hex digits: CuPy gives 16 raw bytes, torch a string, with or
    without dashes and a "GPU-" prefix."""
    if isinstance(uuid, (bytes, bytearray)) and len(uuid) == 16:
        return bytes(uuid).hex()
    text = uuid.decode(errors="replace") if isinstance(uuid, (bytes, bytearray)) else str(uuid)
    text = text.strip().lower()
    text = text[4:] if text.startswith("gpu-") else text
    return text.replace("-", "")


class _Device:
    """One GPU: its ordinal, its share of the GPU cache, and the sessions using it."""

    def __init__(self, ordinal: int, cache):
        self.ordinal = ordinal
        self.cache = cache  # cuda_memory.SlotPool, or None without --gpu-cache
        self.sessions: set[str] = set()


class CudaBackend(Backend):
    name = "cuda"

    def __init__(self, page_bytes: int, gpu_cache_bytes: int, staging_pages: int, metrics):
        self.cp = load_cupy()
        from stated.backends import cuda_memory, cuda_pages

        self._memory, self._pages = cuda_memory, cuda_pages
        if staging_pages < 2:
            raise ValueError(f"staging_pages must be at least 2 (one page copies while another computes), "
                             f"got {staging_pages}")
        try:
            self._ordinals = self._device_ordinals()
        except self.cp.cuda.runtime.CUDARuntimeError as exc:
            raise RuntimeError(f"CuPy finds no usable CUDA device: {exc}") from None
        if not self._ordinals:
            raise RuntimeError("CuPy sees no CUDA device on this machine")
        self.page_bytes = page_bytes
        self.gpu_cache_bytes = gpu_cache_bytes
        self.staging_pages = staging_pages
        self.depth = staging_pages
        self.metrics = metrics
        self.cache_pages = gpu_cache_bytes // page_bytes if page_bytes else 0
        if gpu_cache_bytes and not self.cache_pages:
            log.warning("--gpu-cache %d bytes holds no whole page of %d bytes: nothing is cached on the GPU",
                        gpu_cache_bytes, page_bytes)
        self.handles = cuda_memory.IpcHandles()
        self._lock = threading.Lock()
        self._devices: dict[int, _Device] = {}
        self._states: dict[str, Any] = {}  # session id -> cuda_pages.DeviceSession
        self._pinned: set[int] = set()
        log.info("CUDA backend: %d device(s), staging %d pages of %d bytes per session, GPU cache %d pages per "
                 "device", len(self._ordinals), staging_pages, page_bytes, self.cache_pages)

    def _device_ordinals(self) -> dict[str, int]:
        """UUID key -> CUDA device ordinal, for every device this process can see."""
        runtime = self.cp.cuda.runtime
        return {uuid_key(runtime.getDeviceProperties(ordinal)["uuid"]): ordinal
                for ordinal in range(runtime.getDeviceCount())}

    # --- the host pools' pinner (stated.paging.host_pool) -------------------------------------------------

    def pin_host(self, address: int, nbytes: int) -> None:
        """Page-locks a host page slot so that copies to and from every GPU run asynchronously."""
        cp = self.cp
        with cp.cuda.Device(min(self._ordinals.values())):
            try:
                cp.cuda.runtime.hostRegister(address, nbytes, self._memory.HOST_REGISTER_PORTABLE)
            except cp.cuda.runtime.CUDARuntimeError as exc:  # still correct, only slower: copies wait
                log.warning("could not page-lock %d bytes of host memory (%s); copies of that page are synchronous",
                            nbytes, exc)
                return
        with self._lock:
            self._pinned.add(address)

    def unpin_host(self, address: int) -> None:
        with self._lock:
            if address not in self._pinned:
                return
            self._pinned.discard(address)
        cp = self.cp
        with cp.cuda.Device(min(self._ordinals.values())):
            try:
                cp.cuda.runtime.hostUnregister(address)
            except cp.cuda.runtime.CUDARuntimeError as exc:
                log.warning("could not unlock host memory at %#x: %s", address, exc)

    # --- device buffers (ShareDeviceBuffers) -------------------------------------------------------

    def _ordinal(self, device: str) -> int:
        ordinal = self._ordinals.get(uuid_key(device))
        if ordinal is None:
            raise InvalidArgument(f"device {device!r} is not a CUDA device this daemon can see; it sees "
                                  f"{len(self._ordinals)} device(s). Run `stated serve` on the trainer's machine, "
                                  f"with the trainer's GPU visible to it (CUDA_VISIBLE_DEVICES)")
        return ordinal

    def _device(self, ordinal: int) -> _Device:
        with self._lock:
            dev = self._devices.get(ordinal)
            if dev is None:
                cache = (self._memory.SlotPool(ordinal, self.page_bytes, self.cache_pages)
                         if self.cache_pages else None)
                dev = self._devices[ordinal] = _Device(ordinal, cache)
            return dev

    def share(self, session, region_index: int, params: tuple[bytes, int, int],
              grads: tuple[bytes, int, int]) -> None:
        """Opens a region's parameter and gradient buffers, each (IPC handle, offset in its block,
        size): the store has checked the handle lengths, the region and the sizes."""
        region = session.regions[region_index]
        ordinal = self._ordinal(region.device)
        state = self._states.get(session.id)
        if state is not None and region_index in state.buffers:
            raise InvalidArgument(f"region {region_index} already has device buffers; they are shared once, "
                                  f"after Register")
        opened = []
        try:
            buffers = []
            for what, (handle, offset, size) in (("params", params), ("grads", grads)):
                if offset < 0:
                    raise InvalidArgument(f"{what}.offset_bytes is {offset}; it must be >= 0")
                base = self.handles.open(ordinal, handle, what)
                opened.append(handle)
                shared = self._memory.SharedBuffer(bytes(handle), base + offset, size)
                with self.cp.cuda.Device(ordinal):
                    self._memory.check_bounds(shared, base, region.arena_bytes, what)
                buffers.append(shared)
            if state is None:
                dev = self._device(ordinal)
                state = self._pages.DeviceSession(self, session, dev)
                self._states[session.id] = state
                with self._lock:
                    dev.sessions.add(session.id)
            state.buffers[region_index] = (buffers[0], buffers[1])
        except BaseException:
            for handle in opened:
                self.handles.release(ordinal, handle)
            raise
        log.info("session %s region %d: device buffers opened on CUDA device %d (%d bytes each)", session.id,
                 region_index, ordinal, region.arena_bytes)

    def ready(self, session) -> str | None:
        """None when every CUDA region of the session has its buffers, else a sentence naming one."""
        state = self._states.get(session.id)
        for index, region in enumerate(session.regions):
            if region.device and (state is None or index not in state.buffers):
                return (f"region {index} (tensors {region.tensors.start}..{region.tensors.stop - 1}) has no device "
                        f"buffers yet: the client shares them with ShareDeviceBuffers after Register")
        return None

    def close(self, session) -> None:
        state = self._states.pop(session.id, None)
        if state is None:
            return
        try:
            state.close()
        finally:
            for params, grads in state.buffers.values():
                self.handles.release(state.ordinal, params.handle)
                self.handles.release(state.ordinal, grads.handle)
            with self._lock:
                state.dev.sessions.discard(session.id)
                idle = not state.dev.sessions
            if idle:
                if state.dev.cache is not None:
                    state.dev.cache.trim()
                with self.cp.cuda.Device(state.ordinal):
                    self.cp.get_default_memory_pool().free_all_blocks()
            self._set_resident_gauge()

    def _state(self, session):
        state = self._states.get(session.id)
        if state is None:  # the store checks ready() first
            raise InvalidArgument(self.ready(session) or f"session {session.id} has no CUDA regions")
        return state

    def cache_share(self, dev: _Device) -> int:
        """Pages of the GPU cache one session on `dev` may hold: the device's cache split evenly."""
        if dev.cache is None:
            return 0
        with self._lock:
            return dev.cache.capacity // max(1, len(dev.sessions))

    def _set_resident_gauge(self) -> None:
        total = sum(s.cached_bytes for s in list(self._states.values()))
        self.metrics.resident_bytes.labels("gpu").set(total)

    # --- one step (stated.backends.base) -----------------------------------------------------------

    def check_gradients(self, session, active: Sequence[int], grad_scale: float,
                        max_grad_norm: float) -> GradientCheck:
        state = self._state(session)
        state.begin()
        inv_scale = 1.0 / grad_scale if grad_scale else 1.0
        if not grad_scale and not max_grad_norm or not active:
            state.multiplier = inv_scale
            return GradientCheck(0.0, False)
        total, bad = state.gradient_stats(active, inv_scale)
        norm = math.sqrt(total) if total >= 0 else float("nan")
        if bad or not math.isfinite(norm):
            return GradientCheck(norm if not math.isfinite(norm) else float("inf"), True)
        state.multiplier = GradientCheck.multiplier(norm, grad_scale, max_grad_norm)
        return GradientCheck(norm, False)

    def begin_step(self, session, groups: list[Hyperparameters], active: Sequence[int]) -> None:
        self._state(session).begin_step(groups, active)

    def lend_host_pages(self, session, host) -> None:
        state = self._states.get(session.id)
        if state is not None:
            state.host = host

    def run_page(self, session, page: int, bound, groups: list[Hyperparameters], pass_index: int,
                 has_grad: bytes | None) -> Any:
        return self._state(session).run_page(page, bound, pass_index, has_grad)

    def host_pages(self, session, order: list[int]) -> list[int]:
        """Leaves out the pages in the GPU cache and those without state (nothing to copy)."""
        state = self._states.get(session.id)
        if state is None:
            return order
        table = session.table
        wanted = [page for page in order if page not in state.cached and table[page].page.extent]
        return order if len(wanted) == len(order) else wanted

    def retire(self, ticket: Any) -> bool:
        return ticket.owner.retire(ticket)

    def between_passes(self, session, groups: list[Hyperparameters], active: Sequence[int],
                       pass_index: int) -> None:
        self._state(session).between_passes(pass_index)

    def end_step(self, session) -> None:
        self._state(session).end_step()
        self._set_resident_gauge()

    def flush(self, session) -> None:
        state = self._states.get(session.id)
        if state is not None:
            state.flush()

    def invalidate(self, session) -> None:
        state = self._states.get(session.id)
        if state is not None:
            state.invalidate()
            self._set_resident_gauge()
