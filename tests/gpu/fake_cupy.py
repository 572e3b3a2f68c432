"""A stand-in for CuPy and the kernel runner on the host, for CPU tests of the CUDA backend's bookkeeping
(tests/stated/test_cuda_backend_import.py). It checks what can be checked without a GPU: which buffer
holds which page, that every page the backend changes reaches the host tier, that every pager.get is
matched by one pager.done, the GPU cache's evictions and flushes, master weights filled from the
parameters, and the metrics. It cannot check stream ordering: copies happen at once and events are
always complete.

"Device" memory is host memory: CUDA IPC handles carry a host address in their first 8 bytes, page
buffers are torch byte tensors, and a page launch runs the algorithm's CPU update on views of the
buffers the launch names, as the CPU backend does (so results are bit-for-bit the CPU backend's).
"""

from __future__ import annotations

import ctypes
import types

import numpy as np
import torch

from stated_kernels import cuda_runner, cuda_small
from stated_kernels.spec import Segment

UUID = bytes(range(16))  # the one fake device's UUID


class CUDARuntimeError(RuntimeError):
    def __init__(self, status: int, message: str = "fake CUDA error"):
        super().__init__(message)
        self.status = status


class Device:
    """Reusable, like CuPy's; also tests/kernels/test_cuda_emulated.py's device. Work on it is done
    when it returns, so synchronize has nothing to wait for."""

    def __init__(self, ordinal: int = 0):
        self.id = ordinal

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def synchronize(self) -> None:
        pass


class Stream:
    def __init__(self, null=False, non_blocking=False):
        self.ptr = id(self)

    def wait_event(self, event) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class Event:
    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self.recorded = False

    def record(self, stream=None) -> None:
        self.recorded = True

    def synchronize(self) -> None:
        pass

    @property
    def done(self) -> bool:
        return True


class Memory:
    live = 0  # bytes of fake device memory alive, for the tests' bounds

    def __init__(self, size: int):
        self._buffer = torch.zeros(max(size, 1), dtype=torch.uint8)
        self.ptr = self._buffer.data_ptr()
        self.size = size
        Memory.live += size

    def __del__(self):
        Memory.live -= self.size


class UnownedMemory:
    def __init__(self, ptr, size, owner, device_id=-1):
        self.ptr, self.size = ptr, size


class MemoryPointer:
    def __init__(self, mem, offset):
        self.mem, self.ptr = mem, mem.ptr + offset


def host_view(ptr: int, nbytes: int, dtype) -> np.ndarray:
    return np.frombuffer((ctypes.c_uint8 * nbytes).from_address(ptr), dtype=np.uint8).view(dtype)


def torch_view(ptr: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    nbytes = count * dtype.itemsize
    raw = (ctypes.c_uint8 * max(nbytes, 1)).from_address(ptr)
    return torch.frombuffer(raw, dtype=torch.uint8, count=nbytes).view(dtype) if nbytes else torch.empty(0, dtype=dtype)


def ndarray(shape, dtype, memptr):
    count = int(np.prod(shape))
    return host_view(memptr.ptr, count * np.dtype(dtype).itemsize, dtype).reshape(shape)


class Runtime(types.SimpleNamespace):
    memcpyHostToDevice, memcpyDeviceToHost, memcpyDeviceToDevice = 1, 2, 3
    CUDARuntimeError = CUDARuntimeError

    def __init__(self):
        super().__init__()
        self.registered: set[int] = set()
        self.opened: dict[int, int] = {}  # base -> times open
        self.copies: list[tuple[int, int]] = []  # (kind, bytes)

    def getDeviceCount(self) -> int:
        return 1

    def getDeviceProperties(self, ordinal: int) -> dict:
        return {"uuid": UUID, "name": b"fake"}

    def ipcOpenMemHandle(self, handle: bytes, flags: int = 1) -> int:
        base = int.from_bytes(handle[:8], "little")
        if base == 0 or base in self.opened:  # as CUDA: a handle opened twice in one process is refused
            raise CUDARuntimeError(400, "cudaErrorInvalidResourceHandle: invalid resource handle")
        self.opened[base] = 1
        return base

    def ipcCloseMemHandle(self, ptr: int) -> None:
        del self.opened[ptr]

    def hostRegister(self, ptr: int, size: int, flags: int) -> None:
        self.registered.add(ptr)

    def hostUnregister(self, ptr: int) -> None:
        self.registered.discard(ptr)

    def memcpyAsync(self, dst: int, src: int, size: int, kind: int, stream: int) -> None:
        ctypes.memmove(dst, src, size)
        self.copies.append((kind, size))


def make_cupy() -> types.ModuleType:
    cp = types.ModuleType("cupy")
    runtime = Runtime()

    cp.cuda = types.SimpleNamespace(Device=Device, Stream=Stream, Event=Event, Memory=Memory,
                                    UnownedMemory=UnownedMemory, MemoryPointer=MemoryPointer, runtime=runtime,
                                    memory=types.SimpleNamespace(OutOfMemoryError=MemoryError))
    cp.ndarray = ndarray
    cp.dtype = np.dtype
    cp.float16, cp.float32, cp.uint16, cp.uint32 = np.float16, np.float32, np.uint16, np.uint32
    cp.copyto = np.copyto
    cp.left_shift = np.left_shift
    cp.asnumpy = lambda a, stream=None: np.asarray(a)
    cp.get_default_memory_pool = lambda: types.SimpleNamespace(free_all_blocks=lambda: None)
    return cp


# --- the runner ----------------------------------------------------------------------------------


class HostAlgorithm(cuda_runner.CudaAlgorithm):
    """CudaAlgorithm whose launches run the CPU update (single-pass algorithms with elementwise fields)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.schedule.prepass or self.passes != 1:
            raise NotImplementedError(f"{self.name}: the host stand-in runs single-pass algorithms only")
        self.rows: dict[int, tuple] = {}
        self.launches = 0

    def load(self) -> None:
        pass

    def device_small(self, info, small):
        return cuda_small.DeviceSmall(cuda_small.SmallPlan(), {-1: small}, [0] * 8)

    def copy_small_to_host(self, device_small, small) -> None:
        assert device_small.arrays[-1] is small

    def tensor_row(self, row, info, hp, step, device_small, param_offset, grad_offset, grad_multiplier=1.0):
        super().tensor_row(row, info, hp, step, device_small, param_offset, grad_offset, grad_multiplier)
        self.rows[info.index] = (info, hp, device_small.arrays[-1])

    def page(self, stream, pass_index, segments_dev, nseg, tiles, tensors_dev, param_ptr, grad_ptr, page_ptr, flags):
        self.launches += 1
        names = [name for name, _ in self.cuda.slots]
        P, size = self.param_dtype, self.param_dtype.itemsize
        segments, arena_params, hp = [], [], None
        for row in segments_dev[:nseg]:
            index, length = int(row["tensor"]), int(row["length"])
            info, hp, small = self.rows[index]
            multiplier = float(tensors_dev[index]["hp"][cuda_runner.ct.GRAD_SCALE])
            param = torch_view(param_ptr + int(row["param"]) * size, length, P)
            grad = torch_view(grad_ptr + int(row["grad"]) * size, length, P)
            if multiplier != 1.0:
                grad = grad * multiplier
            fields = {}
            for slot, offset in enumerate(row["field"]):
                if offset >= 0:
                    dtype = torch.float32 if names[slot] == "master" else self.kernel_state
                    fields[names[slot]] = torch_view(page_ptr + int(offset), length, dtype)
            if "master" in fields:  # Note [master weights]
                segments.append(Segment(info, int(row["start"]), fields["master"], grad.float(), fields, small))
                arena_params.append(param)
            else:
                segments.append(Segment(info, int(row["start"]), param, grad, fields, small))
        self.algorithm.update(segments, hp, pass_index)
        for segment, param in zip(segments, arena_params):
            param.copy_(segment.param)


class HostGradStats:
    def __init__(self, param_dtype, device_id=0):
        self.dtype = param_dtype

    def gradstats(self, stream, ids, tensors_dev, grad_ptr, inv_scale):
        sums, bad = [], []
        for index in ids.ids:
            row = tensors_dev[index]
            grad = torch_view(grad_ptr + int(row["grad"]) * self.dtype.itemsize, int(row["numel"]), self.dtype)
            g = grad.double() * np.float32(inv_scale)
            sums.append(float((g * g).sum()))
            bad.append(int((~torch.isfinite(grad)).sum()))
        return np.array(sums, dtype=np.float64), np.array(bad, dtype=np.uint32)


def patch_runner(monkeypatch) -> None:
    monkeypatch.setattr(cuda_runner, "CudaAlgorithm", HostAlgorithm)
    monkeypatch.setattr(cuda_runner, "GradStats", HostGradStats)
    monkeypatch.setattr(cuda_runner, "upload", lambda table, device_id=0, stream=None: np.array(table, copy=True))
    monkeypatch.setattr(cuda_runner, "tensor_list",
                        lambda ids, numels, device_id=0: types.SimpleNamespace(ids=list(ids)))
