"""Compiled kernels and the device side of a launch: the one compile cache (per process, source, dtype
pair and device), tensor lists, table uploads, and the gradient statistics (gradstats.cu).

CuPy is imported inside functions only, so this module imports on a machine without CUDA. Every
device address is a plain int (a CuPy array is taken too, for its `.data.ptr`).
stated_kernels.cuda_runner re-exports the names the backends use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from stated_kernels import cuda_sources as cs
from stated_kernels import cuda_tables as ct
from stated_kernels.cuda_spec import dtype_name

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "uint8": torch.uint8}

_LOCK = threading.Lock()
_MODULES: dict[tuple[str, str, str | None], Any] = {}
_FUNCTIONS: dict[tuple[int, str, str], Any] = {}


def cupy_module():
    import cupy

    return cupy


def ptr(x: Any) -> int:
    """A device address from an int or a CuPy array."""
    data = getattr(x, "data", None)
    return int(data.ptr) if data is not None and hasattr(data, "ptr") else int(x)


def on_stream(stream: Any):
    return stream if stream is not None else contextlib.nullcontext()


def dtype_of(value: object) -> torch.dtype:
    return value if isinstance(value, torch.dtype) else DTYPES[dtype_name(value)]


def function(source: str, kernel: str, param: str, state: str | None, device_id: int):
    """One compiled kernel: the source's module is built once per process and dtype pair (CuPy
    loads it once per device)."""
    cupy = cupy_module()
    key = (device_id, source, cs.kernel_name(kernel, param, state))
    with _LOCK:
        fn = _FUNCTIONS.get(key)
        if fn is None:
            module = _MODULES.get((source, param, state))
            if module is None:
                module = cupy.RawModule(code=cs.source(source), options=tuple(cs.nvrtc_options()),
                                        name_expressions=cs.name_expressions(source, [(param, state)]))
                _MODULES[(source, param, state)] = module
            with cupy.cuda.Device(device_id):
                fn = _FUNCTIONS[key] = module.get_function(key[2])
    return fn


# --- tensor lists, tables, gradient statistics -----------------------------------------------------


@dataclasses.dataclass
class TensorList:
    """The tensor rows of a tensor-list launch (int32 on the device) and its grid x."""

    array: Any
    count: int
    grid_x: int

    def pointer(self, start: int) -> int:
        return ptr(self.array) + 4 * start

    def chunks(self) -> list[tuple[int, int]]:
        """(first, count) of each launch: grid y holds at most ct.MAX_LIST_TENSORS tensors."""
        step = ct.MAX_LIST_TENSORS
        return [(s, min(step, self.count - s)) for s in range(0, self.count, step)]


def tensor_list(ids: Sequence[int], numels: Sequence[int], device_id: int = 0) -> TensorList:
    """Uploads tensor rows `ids` (their elements counts `numels`, for the grid) for launches."""
    cupy = cupy_module()
    with cupy.cuda.Device(device_id):
        array = cupy.asarray(np.asarray(list(ids), dtype=np.int32).reshape(-1))
    return TensorList(array, len(ids), ct.list_blocks(max(numels, default=0)))


def upload(table: np.ndarray, device_id: int = 0, stream: Any = None):
    """A packed table (segment or tensor table) as a device uint8 array; the host table may be
    reused once this returns."""
    cupy = cupy_module()
    with cupy.cuda.Device(device_id), on_stream(stream):
        return cupy.asarray(np.ascontiguousarray(table).view(np.uint8))


class GradStats:
    """Per-tensor float64 sum of squares of (g * inv_scale) and non-finite counts (gradstats.cu)."""

    def __init__(self, param_dtype: object, device_id: int = 0):
        self.P = dtype_name(param_dtype)
        self.device_id = device_id

    def load(self) -> None:
        for name in cs.GRADSTATS.kernels:
            function("gradstats", name, self.P, None, self.device_id)

    def gradstats(self, stream: Any, ids: TensorList, tensors_dev: Any, grad_ptr: Any,
                  inv_scale: float) -> tuple[Any, Any]:
        """(sumsq float64[count], nonfinite uint32[count]) as CuPy arrays, computed on `stream`."""
        cupy = cupy_module()
        partial = function("gradstats", "stated_gradstats_partial", self.P, None, self.device_id)
        finish = function("gradstats", "stated_gradstats_finish", self.P, None, self.device_id)
        x = ids.grid_x
        with cupy.cuda.Device(self.device_id), on_stream(stream):
            part_sum = cupy.empty(max(1, ids.count * x), dtype=cupy.float64)
            part_bad = cupy.empty(max(1, ids.count * x), dtype=cupy.uint32)
            sumsq = cupy.zeros(ids.count, dtype=cupy.float64)
            nonfinite = cupy.zeros(ids.count, dtype=cupy.uint32)
            tensors, grad = np.uint64(ptr(tensors_dev)), np.uint64(ptr(grad_ptr))
            for start, count in ids.chunks():
                ps, pb = ptr(part_sum) + 8 * start * x, ptr(part_bad) + 4 * start * x
                partial((x, count), (ct.THREADS,), (np.uint64(ids.pointer(start)), np.int32(count), tensors, grad,
                                                    np.float32(inv_scale), np.uint64(ps), np.uint64(pb)))
                finish((1, count), (ct.THREADS,), (np.int32(x), np.uint64(ps), np.uint64(pb),
                                                   np.uint64(ptr(sumsq) + 8 * start),
                                                   np.uint64(ptr(nonfinite) + 4 * start)))
        return sumsq, nonfinite
