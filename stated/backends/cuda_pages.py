"""One session's side of the CUDA backend: its streams, staging ring, GPU cache residency and small
state on the device, and the page pipeline the engine drives through stated.backends.cuda.

Imported only by stated.backends.cuda, after it has loaded CuPy. Every kernel is launched through
stated_kernels.cuda_runner with the tables of stated.backends.cuda_launches (which also fills fresh
master weights); the only other device work here is copies.

Note [page pipeline]: three streams per session. For a page that is not in the GPU cache:

    h2d stream:     wait(buffer free) -> copy host page into a staging buffer -> event copied_in
    kernel stream:  wait(copied_in)   -> the page's launches                  -> event used
    d2h stream:     wait(used)        -> copy the staging buffer back         -> event copied_out

`retire(ticket)` waits for copied_out on the host, after which the engine gives the page back to the
pager: the only point where the host waits for a page. Up to `staging_pages` pages are in flight, one per
staging buffer, so the copy in of page k+1, the kernels of page k and the copy out of page k-1
overlap. A page in the GPU cache only takes the kernel stream.

Note [GPU cache residency]: with --gpu-cache, a session's pages stay on the device under the same
most-recently-used policy as the host tier (Note [cyclic scan eviction] in stated.paging.residency), and are
written back (copied out and handed to the pager dirty) only when evicted, or by `flush`. Under a
cyclic scan the policy evicts the page just used to admit the next, so a faulting page never copies
into the victim's buffer (which would serialise copy out, copy in and kernel): it copies into a
staging buffer, which becomes its cache slot, and the victim's buffer takes that place in the ring
once its copy out is ordered (Note [capacity and staging] in stated.paging.residency, on the device).

Note [host pages in flight]: every host page is given back exactly once: the engine's pages when
their tickets retire, and those borrowed from the engine's HostPages (Note [host pages lent to a
backend] in stated.engine) by the ticket that borrowed them. A page evicted from the GPU cache while
the ticket that brought it is still in flight is copied back into that ticket's host buffer and the
ticket becomes dirty; otherwise the eviction borrows the host page and a write-back ticket rides on
the current page's ticket, retired with it. The cache's residency is recorded here (`cached`), not in
the page table: the pager's tiers stay below it, and a cached page keeps its host-tier entry.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import cupy as cp
import torch

from stated.backends.cuda_launches import LaunchTables
from stated.backends.cuda_memory import PageBuffer
from stated.paging.residency import ResidencyPolicy
from stated_kernels import cuda_runner, cuda_small

log = logging.getLogger("stated.cuda")

H2D = cp.cuda.runtime.memcpyHostToDevice
D2H = cp.cuda.runtime.memcpyDeviceToHost


@dataclasses.dataclass(eq=False)
class Ticket:
    """A page in flight: its host buffer, and what to wait for before it is given back (Note [host
    pages in flight])."""

    owner: DeviceSession
    page: int
    host: torch.Tensor
    event: Any = None  # a CuPy event: the last copy that reads or writes `host`
    dirty: bool = False  # the host buffer was written
    borrowed: bool = False  # from HostPages (given back here), not from the engine (given back there)
    writebacks: list[Ticket] = dataclasses.field(default_factory=list)


def _event(stream) -> Any:
    event = cp.cuda.Event(disable_timing=True)
    event.record(stream)
    return event


class DeviceSession:
    def __init__(self, backend, session, dev):
        self.backend = backend
        self.session = session
        self.dev = dev
        self.ordinal = dev.ordinal
        self.device = cp.cuda.Device(self.ordinal)
        self.metrics = backend.metrics
        self.buffers: dict[int, tuple[Any, Any]] = {}  # region -> (params, grads) cuda_memory.SharedBuffer
        self.arena_dtype: torch.dtype = session.dtype
        with self.device:
            self.h2d = cp.cuda.Stream(non_blocking=True)
            self.compute = cp.cuda.Stream(non_blocking=True)
            self.d2h = cp.cuda.Stream(non_blocking=True)
        state_dtype = session.tensors[0].info.dtype  # float32 with master weights
        self.runner = cuda_runner.CudaAlgorithm(session.algorithm, self.arena_dtype, state_dtype, self.ordinal)
        self.runner.load()  # compile now (at ShareDeviceBuffers), not in the first step
        self.stats = cuda_runner.GradStats(self.arena_dtype, self.ordinal)
        self.staging: list[PageBuffer] = []
        self._next_staging = 0
        self.policy = ResidencyPolicy(0)
        self.cached: dict[int, PageBuffer] = {}
        self.dirty: set[int] = set()  # cached pages newer than their host copy
        self.cached_bytes = 0
        self.holding: dict[int, Ticket] = {}  # host pages in flight, not yet given back
        self.host = None  # the engine's HostPages (stated.engine), lent before each step and flush
        self.small: dict[int, cuda_small.DeviceSmall] = {}
        self.tables = LaunchTables(session, self.runner, self.ordinal, self.device, self.compute)
        self.tensors_dev = None
        self.flags: dict[int, int] = {}
        self.multiplier = 1.0

    # --- buffers ---------------------------------------------------------------------------------

    def _pointers(self, region: int) -> tuple[int, int]:
        params, grads = self.buffers[region]
        return params.ptr, grads.ptr

    # --- step -----------------------------------------------------------------------------------

    def begin(self) -> None:
        """Start of a step (before the gradient checks)."""
        if self.holding:
            self._recover()
        self.tables.layout()
        self._apply_cache_share()

    def gradient_stats(self, active, inv_scale: float) -> tuple[float, int]:
        """(sum of squares of the unscaled gradients, count of non-finite values) over `active`."""
        parts = []
        with self.device, self.compute:
            tensors_dev = cuda_runner.upload(self.tables.table, self.ordinal, self.compute)
            for region, ids in self.tables.tensor_lists(active).items():
                _, grads = self._pointers(region)
                parts.append(self.stats.gradstats(self.compute, ids, tensors_dev, grads, inv_scale))
            host = [(cp.asnumpy(s, stream=self.compute), cp.asnumpy(b, stream=self.compute)) for s, b in parts]
        total = sum(float(s.sum()) for s, _ in host)
        bad = sum(int(b.sum()) for _, b in host)
        return total, bad

    def begin_step(self, groups, active) -> None:
        session, runner = self.session, self.runner
        with self.device, self.compute:
            for index in active:
                info = session.tensors[index].info
                hp, small = groups[info.group], session.small[index]
                session.algorithm.begin_step(info, small, hp)  # step counts stay on the host
                device_small = self.small.get(index)
                if device_small is None:
                    device_small = self.small[index] = runner.device_small(info, small)
                offset = self.tables.offset(index)
                runner.tensor_row(self.tables.table[index], info, hp, float(small["step"]), device_small, offset, offset,
                                  self.multiplier)
            self.tensors_dev = cuda_runner.upload(self.tables.table, self.ordinal, self.compute)
            self.flags = {group: runner.flags(hp) for group, hp in enumerate(groups)}
            lists = self.tables.tensor_lists(active)
            if runner.schedule.prepass:
                for region, ids in lists.items():
                    runner.prepass(self.compute, ids, self.tensors_dev, *self._pointers(region))

    def between_passes(self, pass_index: int) -> None:
        with self.device, self.compute:
            for region, ids in self.tables.lists.items():
                self.runner.between(self.compute, pass_index, ids, self.tensors_dev, *self._pointers(region))

    def end_step(self) -> None:
        with self.device:
            self._sync()
        self.tables.step_arrays.clear()

    def _sync(self) -> None:
        self.compute.synchronize()
        self.d2h.synchronize()
        self.h2d.synchronize()

    # --- pages ----------------------------------------------------------------------------------

    def run_page(self, page: int, bound, pass_index: int, has_grad: bytes | None) -> Ticket | None:
        """Note [page pipeline]; returns the ticket, or None when no host page is in flight. `bound`
        is the page on its host buffer, None for a page the cache held when the pass began."""
        nbytes = self.session.table[page].page.extent
        with self.device:
            if nbytes == 0:  # no state (SGD without momentum): only the parameters change
                self._launch(page, None, pass_index, has_grad)
                return None
            buffer = self.cached.get(page)
            if buffer is not None:
                self.policy.access(page)
                self._launch(page, buffer, pass_index, has_grad)
                self.dirty.add(page)
                return None
            self.metrics.page_faults.labels("gpu").inc()
            borrowed = bound is None  # evicted since the pass began: the engine did not get it
            host = (self.host.borrow(page) if borrowed else bound).buffer
            ticket = Ticket(self, page, host, borrowed=borrowed)
            self.holding[page] = ticket
            buffer, admitted = self._place(page, ticket)
            self._copy_in(buffer, host, nbytes)
            self._launch(page, buffer, pass_index, has_grad)
            if admitted:
                self.cached[page] = buffer
                self.cached_bytes += self.session.table[page].page.nbytes
                self.dirty.add(page)
                ticket.event = buffer.copied_in  # the host copy is unchanged; only the read must be over
            else:
                ticket.event = self._copy_out(buffer, host, nbytes)
                ticket.dirty = True
            return ticket

    def retire(self, ticket: Ticket) -> bool:
        """Waits for the ticket's copies; True when its host page was written."""
        self._finish(ticket)
        for writeback in ticket.writebacks:
            self._finish(writeback)
        return ticket.dirty

    def _finish(self, ticket: Ticket) -> None:
        if ticket.event is not None:
            ticket.event.synchronize()
        if self.holding.get(ticket.page) is ticket:
            del self.holding[ticket.page]
        if ticket.borrowed:
            self.host.give_back(ticket.page, ticket.dirty)

    def _staging_index(self) -> int:
        if not self.staging:
            with self.device:
                self.staging = [PageBuffer(self.backend.page_bytes) for _ in range(self.backend.staging_pages)]
        index = self._next_staging
        self._next_staging = (index + 1) % len(self.staging)
        return index

    def _place(self, page: int, ticket: Ticket) -> tuple[PageBuffer, bool]:
        """The buffer the page is copied into, and whether it stays there as a cache slot."""
        if self.policy.capacity > 0:
            decision = self.policy.access(page)
            if decision.evict is not None:  # Note [GPU cache residency]: swap with a staging buffer
                victim = self._evict(decision.evict, ticket)
                index = self._staging_index()
                buffer, self.staging[index] = self.staging[index], victim
                return buffer, True
            slot = self.dev.cache.take()
            if slot is not None:
                return slot, True
            self.policy.remove(page)  # the device's cache is full (other sessions hold it): stream
        index = self._staging_index()  # (first: it makes the ring)
        return self.staging[index], False

    def _evict(self, victim: int, ticket: Ticket | None) -> PageBuffer:
        """Takes `victim` out of the cache, copying it back if it is dirty; returns its buffer."""
        buffer = self.cached.pop(victim)
        nbytes = self.session.table[victim].page.extent  # what a copy moves
        self.cached_bytes -= self.session.table[victim].page.nbytes  # what the tier holds
        self.metrics.page_evictions.labels("gpu").inc()
        if victim not in self.dirty:
            return buffer
        self.dirty.discard(victim)
        owner = self.holding.get(victim)
        if owner is not None:  # still in flight: its ticket gives the page back, now dirty
            owner.event = self._copy_out(buffer, owner.host, nbytes)
            owner.dirty = True
            return buffer
        writeback = Ticket(self, victim, self.host.borrow(victim).buffer, dirty=True, borrowed=True)
        writeback.event = self._copy_out(buffer, writeback.host, nbytes)
        if ticket is None:  # outside a pass: back at once
            self._finish(writeback)
        else:
            self.holding[victim] = writeback
            ticket.writebacks.append(writeback)
        return buffer

    def _copy_in(self, buffer: PageBuffer, host: torch.Tensor, nbytes: int) -> None:
        self.h2d.wait_event(buffer.used)
        self.h2d.wait_event(buffer.copied_out)
        cp.cuda.runtime.memcpyAsync(buffer.ptr, host.data_ptr(), nbytes, H2D, self.h2d.ptr)
        buffer.copied_in = _event(self.h2d)
        self.compute.wait_event(buffer.copied_in)
        self.metrics.transfer_bytes.labels("host_to_gpu").inc(nbytes)

    def _copy_out(self, buffer: PageBuffer, host: torch.Tensor, nbytes: int):
        self.d2h.wait_event(buffer.used)
        cp.cuda.runtime.memcpyAsync(host.data_ptr(), buffer.ptr, nbytes, D2H, self.d2h.ptr)
        buffer.copied_out = _event(self.d2h)
        self.metrics.transfer_bytes.labels("gpu_to_host").inc(nbytes)
        return buffer.copied_out

    def _launch(self, page: int, buffer: PageBuffer | None, pass_index: int, has_grad: bytes | None) -> None:
        """The page's kernels on the kernel stream, one launch per param group."""
        session = self.session
        entry = session.table[page]
        params, grads = self._pointers(entry.page.region)
        page_ptr = buffer.ptr if buffer is not None else 0
        with self.compute:
            pending = session.master_pending.pop(page, None)
            if pending:
                self.tables.fill_master(entry, page_ptr, params, pending)
            for launch in self.tables.launches(entry, has_grad):
                self.runner.page(self.compute, pass_index, launch.table, launch.nseg, launch.tiles, self.tensors_dev,
                                 params, grads, page_ptr, self.flags[launch.group])
        if buffer is not None:
            buffer.used = _event(self.compute)

    # --- the GPU cache ----------------------------------------------------------------------------

    def _apply_cache_share(self) -> None:
        """The session's pages of the device's cache, recomputed as sessions come and go."""
        want = self.backend.cache_share(self.dev)
        if want == self.policy.capacity:
            return
        victims = self.policy.resize(want)
        if not victims:
            return
        with self.device:
            self._sync()
            for page in victims:
                buffer = self._evict(page, None)
                buffer.copied_out.synchronize()
                self.dev.cache.give(buffer)

    def flush(self) -> None:
        """Small state into the session's CPU tensors, dirty cached pages into the host tier."""
        session = self.session
        with self.device:
            self._sync()
            for index, device_small in self.small.items():
                self.runner.copy_small_to_host(device_small, session.small[index])
            for page in sorted(self.dirty):
                host = self.host.borrow(page).buffer
                try:
                    self._copy_out(self.cached[page], host, session.table[page].page.extent).synchronize()
                finally:
                    self.host.give_back(page, True)
            self.dirty.clear()

    def invalidate(self) -> None:
        """Forgets device copies of pages and small state (the host tier was rewritten)."""
        with self.device:
            self._sync()
        for page, buffer in self.cached.items():
            self.policy.remove(page)
            self.dev.cache.give(buffer)
        self.cached.clear()
        self.dirty.clear()
        self.cached_bytes = 0
        self.small.clear()
        self.tensors_dev = None

    def _recover(self) -> None:
        """A step that failed half-way left tickets unretired: the engine gave their host pages back
        (their state is what the failed step left); forget the tickets once the streams are idle."""
        log.warning("session %s: a failed step left %d pages in flight", self.session.id, len(self.holding))
        with self.device:
            self._sync()
        self.holding.clear()

    def close(self) -> None:
        try:
            with self.device:
                self._sync()
        except cp.cuda.runtime.CUDARuntimeError as exc:
            log.warning("session %s: waiting for its GPU work failed: %s", self.session.id, exc)
        if self.dev.cache is not None:
            for buffer in self.cached.values():
                self.dev.cache.give(buffer)
        self.cached.clear()
        self.cached_bytes = 0
        self.holding.clear()
        with self.device:
            self.staging.clear()
            self.small.clear()
            self.tables.clear()
            self.tensors_dev = None
