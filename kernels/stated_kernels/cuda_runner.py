"""Drives the CUDA kernels of `stated_kernels/cuda/`: the one place where the daemon's CUDA backend and
the GPU tests compile them, fill their tables and launch them (launch ABI: cuda/README.md).

CuPy is imported inside functions only, so this module imports, and its table and slot helpers run,
on a machine without CUDA. Every device address is a plain int (a CuPy array is taken too, for its
`.data.ptr`), so a backend can pass memory it opened through CUDA IPC.

    algo = CudaAlgorithm(algorithm, param_dtype, state_dtype, device_id)

`algorithm` is a stated_kernels `Algorithm`; `param_dtype` the arenas' dtype (P); `state_dtype` the
dtype of the tensors as the algorithm sees them (`TensorInfo.dtype`: the parameter's, or float32
with master weights). Kernels compile on first use (or `algo.load()`), once per process, source,
dtype pair and device.

Layout (pure, no CUDA):

    algo.field_slots(place_fields) -> list[str | None]   kernel slot -> FieldSpec name (None: absent)
    algo.field_offsets(places) -> list[int]              kernel slot -> byte offset in the page, -1
    algo.segment_rows(segments, param_offsets, grad_offsets=None, tensor_rows=None) -> np.ndarray
    algo.small_plan(info, small) -> SmallPlan            shape class and small buffers of a tensor
    algo.tensor_row(row, info, hp, step, device_small, param_offset, grad_offset, grad_multiplier=1.0)
    algo.flags(hp) -> int

Device state (CuPy):

    algo.device_small(info, small) -> DeviceSmall        copies the CPU small state, allocates scratch
    algo.copy_small_to_host(device_small, small)         state back into the CPU tensors (state_dict)
    algo.copy_small_to_device(device_small, small)       after the CPU tensors were rewritten (import)
    tensor_list(ids, numels, device_id) -> TensorList    tensor rows of a launch, with its grid
    upload(table, device_id, stream=None) -> cupy array  a packed table (segments or tensors)

One step, in the engine's order (Note [step order] in stated_kernels.spec); `stream` is a
cupy.cuda.Stream (None: the current one), launches are asynchronous:

    for each tensor with a gradient: algorithm.begin_step (host: small["step"] += 1) and tensor_row
    tensors_dev = upload(table, ...)
    algo.prepass(stream, ids, tensors_dev, param_ptr, grad_ptr)
    for k in range(algo.passes):
        for each page: algo.page(stream, k, segments_dev, nseg, tiles, tensors_dev, param_ptr,
                                 grad_ptr, page_ptr, flags)
        if k + 1 < algo.passes: algo.between(stream, k, ids, tensors_dev, param_ptr, grad_ptr)

and for the gradient checks (Note [gradient checks] in stated/backends/base.py), before the step:

    sumsq, nonfinite = GradStats(param_dtype, device_id).gradstats(stream, ids, tensors_dev,
                                                                   grad_ptr, inv_scale)

(float64 and uint32 CuPy arrays, one entry per position in `ids`). The tensor rows that gradstats
reads (`grad`, `numel`) need no step scalars, so the table may be uploaded before `tensor_row`
knows the step's multiplier and uploaded again after.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from stated_kernels import cuda_tables as ct
from stated_kernels.cuda_launch import (  # noqa: F401  (GradStats, tensor_list, upload: the backends' entry)
    DTYPES,
    GradStats,
    TensorList,
    cupy_module,
    dtype_of,
    function,
    on_stream,
    ptr,
    tensor_list,
    upload,
)
from stated_kernels.cuda_small import DeviceSmall, SmallPlan
from stated_kernels.cuda_spec import dtype_name
from stated_kernels.spec import Algorithm, FieldSpec, Hyperparameters, TensorInfo

_RAW = {torch.bfloat16: torch.int16, torch.float16: torch.int16}

# --- host copies ----------------------------------------------------------------------------------


def _host_tensor(array: Any, dtype: torch.dtype) -> torch.Tensor:
    flat = torch.from_numpy(cupy_module().asnumpy(array).copy())
    return flat.view(dtype) if dtype in _RAW else flat


def _bits(tensor: torch.Tensor) -> np.ndarray:
    """A CPU tensor's values as a flat numpy array (16-bit floats as their raw bits)."""
    flat = tensor.detach().contiguous().reshape(-1)
    return (flat.view(_RAW[flat.dtype]) if flat.dtype in _RAW else flat).numpy()


# --- the algorithm --------------------------------------------------------------------------------


class CudaAlgorithm:
    def __init__(self, algorithm: Algorithm, param_dtype: object, state_dtype: object, device_id: int = 0):
        if algorithm.cuda is None:
            raise KeyError(f"no CUDA kernels for algorithm {algorithm.name!r}")
        self.algorithm = algorithm
        self.name = algorithm.name
        self.cuda = algorithm.cuda
        self.source = self.cuda.name
        self.schedule = self.cuda.schedule
        if self.schedule.passes != algorithm.passes:
            raise ValueError(f"{self.name}: the CUDA kernels take {self.schedule.passes} passes, the CPU "
                             f"module {algorithm.passes}")
        self.param_dtype = dtype_of(param_dtype)
        self.state_dtype = dtype_of(state_dtype)
        self.device_id = device_id
        self.P = dtype_name(self.param_dtype)
        self.S = self.cuda.state_dtype(dtype_name(self.state_dtype))
        if (self.P, self.S) not in self.cuda.pairs:
            raise ValueError(f"{self.name}: no CUDA kernels for parameters {self.P} with state {self.S}; "
                             f"pairs: {self.cuda.pairs}")
        self.kernel_state = DTYPES[self.S]
        self._slots = {name: (k, allowed) for k, (name, allowed) in enumerate(self.cuda.slots)}
        self._slot_cache: dict[tuple[FieldSpec, ...], list[str | None]] = {}
        self._qmaps_dev = None

    @property
    def passes(self) -> int:
        return self.schedule.passes

    def flags(self, hp: Hyperparameters) -> int:
        return self.algorithm.cuda_flags(hp)

    # --- page fields ------------------------------------------------------------------------------

    def field_slots(self, place_fields: Sequence[FieldSpec]) -> list[str | None]:
        """Kernel slot order of a tensor's page fields: slot k holds the field named result[k]. Raises
        ValueError naming a field the kernels do not know, hold in another dtype, or get twice."""
        key = tuple(place_fields)
        cached = self._slot_cache.get(key)
        if cached is not None:
            return cached
        slots: list[str | None] = [None] * len(self._slots)
        for field in key:
            if field.name not in self._slots:
                raise ValueError(f"{self.name}: the CUDA kernels have no slot for page field {field.name!r}; "
                                 f"known: {', '.join(self._slots)}")
            k, allowed = self._slots[field.name]
            dtypes = [self.kernel_state if a == "S" else DTYPES[a] for a in allowed]
            if field.dtype not in dtypes:
                raise ValueError(f"{self.name}: page field {field.name!r} is {field.dtype}, the CUDA kernels "
                                 f"take {' or '.join(map(str, dtypes))}")
            if slots[k] is not None:
                raise ValueError(f"{self.name}: page field {field.name!r} appears twice")
            slots[k] = field.name
        self._slot_cache[key] = slots
        return slots

    def field_offsets(self, places: Sequence[Any]) -> list[int]:
        """Byte offsets in the page of a segment's fields (layout.FieldPlace: .field, .offset) in
        slot order, -1 where a slot is absent."""
        slots = self.field_slots([p.field for p in places])
        offsets = {p.field.name: p.offset for p in places}
        return [-1 if name is None else offsets[name] for name in slots]

    def segment_rows(self, segments: Sequence[Any], param_offsets: Mapping[int, int] | Sequence[int],
                     grad_offsets: Mapping[int, int] | Sequence[int] | None = None,
                     tensor_rows: Mapping[int, int] | Sequence[int] | None = None) -> np.ndarray:
        """The segment table of one launch from a page's segments (layout.PageSegment: .tensor, .start,
        .length, .fields), in page order. `param_offsets[t]` / `grad_offsets[t]` are tensor t's
        element offsets in the arenas the launch gets (grad: the same as param when None);
        `tensor_rows[t]` its row in the tensor table (t itself when None)."""
        grad_offsets = param_offsets if grad_offsets is None else grad_offsets
        entries = []
        for seg in segments:
            if seg.start % self.algorithm.block_elements:
                raise ValueError(f"{self.name}: a segment of tensor {seg.tensor} starts at {seg.start}, "
                                 f"not on a {self.algorithm.block_elements}-element block")
            entries.append({
                "param": param_offsets[seg.tensor] + seg.start,
                "grad": grad_offsets[seg.tensor] + seg.start,
                "length": seg.length,
                "start": seg.start,
                "tensor": seg.tensor if tensor_rows is None else tensor_rows[seg.tensor],
                "fields": self.field_offsets(seg.fields),
            })
        return ct.segment_table(entries)

    # --- per-tensor rows --------------------------------------------------------------------------

    def small_plan(self, info: TensorInfo, small: Mapping[str, Any]) -> SmallPlan:
        """The tensor's shape class and small buffers (the algorithm's `cuda_small`)."""
        return self.algorithm.cuda_small(info, self.kernel_state, small)

    def tensor_row(self, row: np.void, info: TensorInfo, hp: Hyperparameters, step: float,
                   device_small: DeviceSmall, param_offset: int, grad_offset: int,
                   grad_multiplier: float = 1.0) -> None:
        """Fills one StTensor row (a record of a cuda_tables.tensor_table) for one step: where the
        tensor lies in the arenas (element offsets), its shape class and small buffers, and the hp
        scalars of `hp` at `step` (the CPU module's small "step" after this step's increment), with
        `grad_multiplier` in hp[31]."""
        plan = device_small.plan
        row["param"], row["grad"], row["numel"] = param_offset, grad_offset, info.numel
        row["kind"], row["rows"], row["cols"], row["lead"] = plan.kind, plan.rows, plan.cols, plan.lead
        row["reserved"] = 0
        row["small"][:] = device_small.pointers
        values, _ = ct.host_scalars(self.algorithm, hp, step, numel=info.numel, ndim=len(info.shape), dtype=info.dtype,
                                    grad_multiplier=grad_multiplier)
        row["hp"][:] = values

    # --- small state on the device ----------------------------------------------------------------

    def device_small(self, info: TensorInfo, small: Mapping[str, Any]) -> DeviceSmall:
        """Copies the tensor's small state to the device and allocates its scratch (synchronously)."""
        cupy = cupy_module()
        plan = self.small_plan(info, small)
        arrays = {}
        with cupy.cuda.Device(self.device_id):
            for slot in plan.slots:
                if slot.key is not None:
                    arrays[slot.slot] = cupy.asarray(_bits(small[slot.key]))
                elif slot.const is not None:
                    arrays[slot.slot] = cupy.asarray(np.asarray(slot.const, dtype=np.int64))
                else:  # at least one byte, so that the address is never 0
                    arrays[slot.slot] = cupy.zeros(max(1, slot.count) * slot.dtype.itemsize, dtype=cupy.uint8)
        pointers = [0] * ct.N_SMALL
        for k, array in arrays.items():
            pointers[k] = int(array.data.ptr)
        return DeviceSmall(plan, arrays, pointers)

    def copy_small_to_host(self, device_small: DeviceSmall, small: Mapping[str, Any]) -> None:
        """Writes the device copies of the small state into the CPU tensors of `small` (after the
        kernels that change them have finished: synchronize their stream first)."""
        cupy = cupy_module()
        with cupy.cuda.Device(self.device_id):
            for slot in device_small.plan.slots:
                if slot.key is not None:
                    target = small[slot.key]
                    target.copy_(_host_tensor(device_small.arrays[slot.slot], slot.dtype).view(target.shape))

    def copy_small_to_device(self, device_small: DeviceSmall, small: Mapping[str, Any]) -> None:
        """Overwrites the device copies with the CPU tensors of `small` (after an import)."""
        cupy = cupy_module()
        with cupy.cuda.Device(self.device_id):
            for slot in device_small.plan.slots:
                if slot.key is not None:
                    device_small.arrays[slot.slot].set(_bits(small[slot.key]))

    # --- launches ---------------------------------------------------------------------------------

    def load(self) -> None:
        """Compiles (or finds compiled) every kernel of the algorithm for this device."""
        for name in self.cuda.kernels:
            self._fn(name)

    def _fn(self, name: str):
        return function(self.source, name, self.P, self.S, self.device_id)

    def _qmaps(self):
        if self._qmaps_dev is None:
            cupy = cupy_module()
            from stated_kernels import quant_maps

            maps = torch.cat([quant_maps.dynamic_map(True), quant_maps.dynamic_map(False)]).numpy()
            with cupy.cuda.Device(self.device_id):
                self._qmaps_dev = cupy.asarray(maps)
        return self._qmaps_dev

    def _list(self, names: Sequence[str], stream: Any, ids: TensorList, tensors_dev: Any, param_ptr: Any,
              grad_ptr: Any) -> None:
        cupy = cupy_module()
        tensors, param, grad = np.uint64(ptr(tensors_dev)), np.uint64(ptr(param_ptr)), np.uint64(ptr(grad_ptr))
        with cupy.cuda.Device(self.device_id), on_stream(stream):
            for name in names:
                fn = self._fn(name)
                x = 1 if name in self.cuda.single_block else ids.grid_x
                for start, count in ids.chunks():
                    fn((x, count), (ct.THREADS,), (np.uint64(ids.pointer(start)), np.int32(count), tensors, param,
                                                   grad, np.uint32(0)))

    def prepass(self, stream: Any, ids: TensorList, tensors_dev: Any, param_ptr: Any, grad_ptr: Any) -> None:
        """The tensor-list kernels before page pass 0, over the tensors of `ids`."""
        self._list(self.schedule.prepass, stream, ids, tensors_dev, param_ptr, grad_ptr)

    def between(self, stream: Any, pass_index: int, ids: TensorList, tensors_dev: Any, param_ptr: Any,
                grad_ptr: Any) -> None:
        """The tensor-list kernels after page pass `pass_index` (none after the last)."""
        if pass_index < len(self.schedule.between):
            self._list(self.schedule.between[pass_index], stream, ids, tensors_dev, param_ptr, grad_ptr)

    def page(self, stream: Any, pass_index: int, segments_dev: Any, nseg: int, tiles: int, tensors_dev: Any,
             param_ptr: Any, grad_ptr: Any, page_ptr: Any, flags: int) -> None:
        """Page pass `pass_index` over one launch's segments (one page, one group): `tiles` is
        cuda_tables.total_tiles of the segment table, the grid size."""
        if nseg <= 0 or tiles <= 0:
            return
        cupy = cupy_module()
        args = [np.uint64(ptr(segments_dev)), np.int32(nseg), np.uint64(ptr(tensors_dev)),
                np.uint64(ptr(param_ptr)), np.uint64(ptr(grad_ptr)), np.uint64(ptr(page_ptr)), np.uint32(flags)]
        if self.cuda.quant_maps:
            args.append(np.uint64(ptr(self._qmaps())))
        fn = self._fn(self.schedule.pages[pass_index])
        with cupy.cuda.Device(self.device_id), on_stream(stream):
            fn((int(tiles),), (ct.THREADS,), tuple(args))


