"""One session's side of the CUDA backend: its streams, staging ring, GPU cache residency, tables and
small state on the device, and the page pipeline the engine drives through stated.backends.cuda.

Imported only by stated.backends.cuda, after it has loaded CuPy. Every kernel is launched through
stated_kernels.cuda_runner; the only other device work here is copies, and the one-time fill of fresh
master weights from the parameters (CuPy elementwise casts, Note [master weights] in stated.session).

Note [page pipeline]: three streams per session. For a page that is not in the GPU cache:

    h2d stream:     wait(buffer free) -> copy host page into a staging buffer -> event copied_in
    kernel stream:  wait(copied_in)   -> the page's launches                  -> event used
    d2h stream:     wait(used)        -> copy the staging buffer back         -> event copied_out

`retire(ticket)` waits for copied_out on the host and hands the page back to the pager, which is
the only point where the host waits for a page. Up to `staging_pages` pages are in flight, one per
staging buffer, so the copy in of page k+1, the kernels of page k and the copy out of page k-1
overlap. A page in the GPU cache only takes the kernel stream.

Note [GPU cache residency]: with --gpu-cache, a session's pages stay on the device under the same
most-recently-used policy as the host tier (Note [cyclic scan eviction] in stated.paging.residency), and are
written back (copied out and handed to the pager dirty) only when evicted, or by `flush`. Under a
cyclic scan the policy evicts the page just used to admit the next, so a faulting page never copies
into the victim's buffer (which would serialise copy out, copy in and kernel): it copies into a
staging buffer, which becomes its cache slot, and the victim's buffer takes that place in the ring
once its copy out is ordered (Note [capacity and staging] in stated.paging.residency, on the device).

Note [host pages in flight]: every pager.get is matched by exactly one pager.done. A page evicted
from the GPU cache while the ticket that fetched it is still in flight is copied back into that
ticket's host buffer and the ticket becomes dirty; otherwise the eviction fetches the host page and a
write-back ticket rides on the current page's ticket, retired with it.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import cupy as cp
import torch

from stated.backends.cuda_memory import PageBuffer
from stated.paging.residency import ResidencyPolicy
from stated.session import MASTER
from stated_kernels import cuda_runner, cuda_small
from stated_kernels import cuda_tables as cs

log = logging.getLogger("stated.cuda")

H2D = cp.cuda.runtime.memcpyHostToDevice
D2H = cp.cuda.runtime.memcpyDeviceToHost
D2D = cp.cuda.runtime.memcpyDeviceToDevice


@dataclasses.dataclass(eq=False)
class Ticket:
    """A page the engine has in flight: the host buffer the pager lent, and what to wait for before
    giving it back (Note [host pages in flight])."""

    owner: DeviceSession
    page: int
    host: torch.Tensor
    event: Any = None  # a CuPy event: the last copy that reads or writes `host`
    dirty: bool = False  # the host buffer was written
    writebacks: list[Ticket] = dataclasses.field(default_factory=list)


def _event(stream) -> Any:
    event = cp.cuda.Event(disable_timing=True)
    event.record(stream)
    return event


@dataclasses.dataclass
class _Launch:
    group: int
    table: Any  # the segment table on the device
    nseg: int
    tiles: int
    tensors: tuple[int, ...]


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
        self.element_size = self.arena_dtype.itemsize
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
        self.holding: dict[int, Ticket] = {}  # pages fetched from the pager and not yet handed back
        self.small: dict[int, cuda_small.DeviceSmall] = {}
        self.table = None  # the host tensor table (cuda_tables.TENSOR_DTYPE)
        self.tensors_dev = None
        self.page_launches: dict[int, list[_Launch]] = {}
        self._lists_key: tuple[int, ...] | None = None
        self.lists: dict[int, cuda_runner.TensorList] = {}
        self.flags: dict[int, int] = {}
        self.multiplier = 1.0
        self.step_arrays: list[Any] = []  # device tables of this step only (masked launches)

    # --- layout ---------------------------------------------------------------------------------

    def offset(self, index: int) -> int:
        """Element offset of tensor `index` in its region's buffers."""
        return self.session.tensors[index].offset_bytes // self.element_size

    def _layout(self) -> None:
        """The host tensor table, one row per registered tensor (it grows with Register)."""
        count = len(self.session.tensors)
        old = 0 if self.table is None else len(self.table)
        if old == count:
            return
        table = cs.tensor_table(count)
        if old:
            table[:old] = self.table
        for index in range(old, count):
            # What gradstats reads before the step's rows are filled (cuda_runner.GradStats).
            offset = self.offset(index)
            table[index]["param"] = table[index]["grad"] = offset
            table[index]["numel"] = self.session.tensors[index].info.numel
        self.table = table

    def _pointers(self, region: int) -> tuple[int, int]:
        params, grads = self.buffers[region]
        return params.ptr, grads.ptr

    def _tensor_lists(self, active) -> dict[int, cuda_runner.TensorList]:
        """The active tensors by region, uploaded for tensor-list launches (kept while they repeat)."""
        key = tuple(active)
        if key != self._lists_key:
            by_region: dict[int, list[int]] = {}
            for index in active:
                by_region.setdefault(self.session.tensors[index].region, []).append(index)
            with self.device, self.compute:
                self.lists = {region: cuda_runner.tensor_list(ids, [self.session.tensors[i].info.numel for i in ids],
                                                              self.ordinal)
                              for region, ids in by_region.items()}
            self._lists_key = key
        return self.lists

    # --- step -----------------------------------------------------------------------------------

    def begin(self) -> None:
        """Start of a step (before the gradient checks)."""
        if self.holding:
            self._recover()
        self._layout()
        self._apply_cache_share()

    def gradient_stats(self, active, inv_scale: float) -> tuple[float, int]:
        """(sum of squares of the unscaled gradients, count of non-finite values) over `active`."""
        parts = []
        with self.device, self.compute:
            tensors_dev = cuda_runner.upload(self.table, self.ordinal, self.compute)
            for region, ids in self._tensor_lists(active).items():
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
                offset = self.offset(index)
                runner.tensor_row(self.table[index], info, hp, float(small["step"]), device_small, offset, offset,
                                  self.multiplier)
            self.tensors_dev = cuda_runner.upload(self.table, self.ordinal, self.compute)
            self.flags = {group: runner.flags(hp) for group, hp in enumerate(groups)}
            lists = self._tensor_lists(active)
            if runner.schedule.prepass:
                for region, ids in lists.items():
                    runner.prepass(self.compute, ids, self.tensors_dev, *self._pointers(region))

    def between_passes(self, pass_index: int) -> None:
        with self.device, self.compute:
            for region, ids in self.lists.items():
                self.runner.between(self.compute, pass_index, ids, self.tensors_dev, *self._pointers(region))

    def end_step(self) -> None:
        with self.device:
            self._sync()
        self.step_arrays.clear()

    def _sync(self) -> None:
        self.compute.synchronize()
        self.d2h.synchronize()
        self.h2d.synchronize()

    # --- pages ----------------------------------------------------------------------------------

    def run_page(self, page: int, pass_index: int, has_grad: bytes | None) -> tuple[Ticket | None, float]:
        """Note [page pipeline]; returns (ticket or None when nothing is owed to the pager, seconds
        the pager made us wait)."""
        nbytes = self.session.table[page].page.extent
        with self.device:
            if nbytes == 0:  # no state (SGD without momentum): only the parameters change
                self._launch(page, None, pass_index, has_grad)
                return None, 0.0
            buffer = self.cached.get(page)
            if buffer is not None:
                self.policy.access(page)
                self._launch(page, buffer, pass_index, has_grad)
                self.dirty.add(page)
                return None, 0.0
            self.metrics.page_faults.labels("gpu").inc()
            host, waited = self.session.pager.get(page)
            ticket = Ticket(self, page, host)
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
            return ticket, waited

    def retire(self, ticket: Ticket) -> None:
        self._finish(ticket)
        for writeback in ticket.writebacks:
            self._finish(writeback)

    def _finish(self, ticket: Ticket) -> None:
        if ticket.event is not None:
            ticket.event.synchronize()
        if self.holding.get(ticket.page) is ticket:
            del self.holding[ticket.page]
        self.session.pager.done(ticket.page, dirty=ticket.dirty)

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
        host, _ = self.session.pager.get(victim)
        writeback = Ticket(self, victim, host, dirty=True)
        writeback.event = self._copy_out(buffer, host, nbytes)
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
            if page in session.master_pending:
                self._fill_master(entry, page_ptr, params)
                session.master_pending.discard(page)
            for launch in self._launches(entry, has_grad):
                self.runner.page(self.compute, pass_index, launch.table, launch.nseg, launch.tiles, self.tensors_dev,
                                 params, grads, page_ptr, self.flags[launch.group])
        if buffer is not None:
            buffer.used = _event(self.compute)

    def _launches(self, entry, has_grad: bytes | None) -> list[_Launch]:
        """The page's launches (segment tables uploaded once per page), less tensors without a gradient."""
        page = entry.page.index
        launches = self.page_launches.get(page)
        if launches is None:
            by_group: dict[int, list] = {}
            for seg in entry.page.segments:
                by_group.setdefault(self.session.tensors[seg.tensor].info.group, []).append(seg)
            launches = [self._upload(group, segs) for group, segs in by_group.items()]
            self.page_launches[page] = launches
        if has_grad is None:
            return launches
        chosen = []
        for launch in launches:
            if all(has_grad[t] for t in launch.tensors):
                chosen.append(launch)
            elif any(has_grad[t] for t in launch.tensors):
                segs = [s for s in entry.page.segments
                        if has_grad[s.tensor] and self.session.tensors[s.tensor].info.group == launch.group]
                masked = self._upload(launch.group, segs)
                self.step_arrays.append(masked.table)
                chosen.append(masked)
        return chosen

    def _upload(self, group: int, segments) -> _Launch:
        rows = self.runner.segment_rows(segments, {s.tensor: self.offset(s.tensor) for s in segments})
        table = cuda_runner.upload(rows, self.ordinal, self.compute)
        return _Launch(group, table, len(rows), cs.total_tiles(rows), tuple(s.tensor for s in segments))

    def _array(self, ptr: int, count: int, dtype) -> Any:
        nbytes = count * cp.dtype(dtype).itemsize
        memory = cp.cuda.UnownedMemory(ptr, nbytes, None, self.ordinal)
        return cp.ndarray((count,), dtype=dtype, memptr=cp.cuda.MemoryPointer(memory, 0))

    def _fill_master(self, entry, page_ptr: int, params_ptr: int) -> None:
        """Fresh master weights (Note [master weights]) from the parameters, on the kernel stream."""
        for seg in entry.page.segments:
            place = next((f for f in seg.fields if f.field.name == MASTER.name), None)
            if place is None:
                continue
            source = params_ptr + self.session.tensors[seg.tensor].offset_bytes + seg.start * self.element_size
            target = page_ptr + place.offset
            if self.arena_dtype == torch.float32:
                cp.cuda.runtime.memcpyAsync(target, source, 4 * seg.length, D2D, self.compute.ptr)
            elif self.arena_dtype == torch.float16:
                cp.copyto(self._array(target, seg.length, cp.float32), self._array(source, seg.length, cp.float16))
            else:  # bfloat16 is the top half of a float32: widening is a shift of the bits
                bits = self._array(target, seg.length, cp.uint32)
                cp.copyto(bits, self._array(source, seg.length, cp.uint16))
                cp.left_shift(bits, cp.uint32(16), out=bits)

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
                host, _ = session.pager.get(page)
                self._copy_out(self.cached[page], host, session.table[page].page.extent).synchronize()
                session.pager.done(page, dirty=True)
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
        """A step that failed half-way left pages fetched: hand them back (their state is what the
        failed step left)."""
        log.warning("session %s: a failed step left %d pages in flight; handing them back", self.session.id,
                    len(self.holding))
        with self.device:
            self._sync()
        for page, ticket in list(self.holding.items()):
            del self.holding[page]
            self.session.pager.done(page, dirty=True)

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
            self.page_launches.clear()
            self.lists.clear()
            self.step_arrays.clear()
            self.tensors_dev = None
