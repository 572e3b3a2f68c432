"""What one session's kernels are launched with on its GPU: the tensor table, the active tensors' lists,
each page's segment tables, and the fill of fresh master weights (stated.backends.cuda_pages runs them).

Imported only by stated.backends.cuda_pages, after CuPy is loaded. The tables are built on the host
(stated_kernels.cuda_tables formats) and uploaded once, then kept while they repeat: a page's segment
tables for the session's life, the tensor lists while the set of tensors with gradients stays the same;
a step that masks part of a page uploads tables for that step only (`step_arrays`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import cupy as cp
import torch

from stated.session import MASTER
from stated_kernels import cuda_runner
from stated_kernels import cuda_tables as cs

D2D = cp.cuda.runtime.memcpyDeviceToDevice


@dataclasses.dataclass
class _Launch:
    group: int
    table: Any  # the segment table on the device
    nseg: int
    tiles: int
    tensors: tuple[int, ...]


class LaunchTables:
    """One session's launch tables on its device (`ordinal`, entered as `device`)."""

    def __init__(self, session, runner: cuda_runner.CudaAlgorithm, ordinal: int, device, compute):
        self.session = session
        self.runner = runner
        self.device = device
        self.ordinal = ordinal
        self.compute = compute  # the session's kernel stream: uploads are ordered before its launches
        self.arena_dtype: torch.dtype = session.dtype
        self.element_size = self.arena_dtype.itemsize
        self.table = None  # the host tensor table (cuda_tables.TENSOR_DTYPE)
        self.page_launches: dict[int, list[_Launch]] = {}
        self._lists_key: tuple[int, ...] | None = None
        self.lists: dict[int, cuda_runner.TensorList] = {}
        self.step_arrays: list[Any] = []  # device tables of this step only (masked launches)

    def offset(self, index: int) -> int:
        """Element offset of tensor `index` in its region's buffers."""
        return self.session.tensors[index].offset_bytes // self.element_size

    def layout(self) -> None:
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

    def tensor_lists(self, active) -> dict[int, cuda_runner.TensorList]:
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

    def launches(self, entry, has_grad: bytes | None) -> list[_Launch]:
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

    def fill_master(self, entry, page_ptr: int, params_ptr: int, tensors: set[int]) -> None:
        """Fresh master weights (Note [master weights]) from the parameters for the page's segments of
        `tensors`, on the kernel stream."""
        for seg in entry.page.segments:
            place = next((f for f in seg.fields if f.field.name == MASTER.name), None)
            if place is None or seg.tensor not in tensors:
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

    def clear(self) -> None:
        self.page_launches.clear()
        self.lists.clear()
        self.step_arrays.clear()
