"""Device memory of the CUDA backend: the trainers' buffers opened over CUDA IPC,
page buffers with the events that order their copies and kernels, and the GPU cache's slot pool.

Imported only by stated.backends.cuda, after it has loaded CuPy (this module imports CuPy at the top).

Note [IPC handles are opened once]: a CUDA IPC handle names a whole cudaMalloc block of the trainer,
and torch's caching allocator often places a region's parameter and gradient buffers (and the buffers
of another optimizer in the same process) in one block. cudaIpcOpenMemHandle refuses to open a handle
that this process has already opened, so the daemon keeps one mapping per (device, handle) with a
count of the regions that use it, and closes it when the last of them goes.

Note [page buffer events]: a page buffer (a staging slot or a GPU cache slot) is written by the
host-to-device stream, read and written by the kernel stream, and read by the device-to-host stream.
Each buffer carries one event per stream, recorded after that stream's last use of it; a stream that
is about to use the buffer waits for the events of the other two. The ordering lives on the device:
the host never synchronises the device to reuse a buffer. An event that was never recorded is
complete, so a fresh buffer needs no special case.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import threading

import cupy as cp

from stated.errors import InvalidArgument

log = logging.getLogger("stated.cuda")

# cudaHostRegisterPortable: the pages are page-locked for every CUDA context of the process (each GPU).
HOST_REGISTER_PORTABLE = 1
# cudaErrorMemoryAllocation: cudaMalloc found no room.
CUDA_ERROR_MEMORY_ALLOCATION = 2


def _cuda_driver():
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None


_DRIVER = _cuda_driver()


def allocation_range(ptr: int) -> tuple[int, int] | None:
    """(base, size) of the device allocation that holds `ptr`, or None where the driver cannot say.
    Needs the device's context current (any CuPy call under `with Device(...)` makes it so)."""
    if _DRIVER is None:
        return None
    base, size = ctypes.c_uint64(0), ctypes.c_size_t(0)
    try:
        status = _DRIVER.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr))
    except AttributeError:
        return None
    return (base.value, size.value) if status == 0 else None


class IpcHandles:
    """The trainers' cudaMalloc blocks opened in this process, counted (Note [IPC handles are opened once])."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[tuple[int, bytes], list[int]] = {}  # (ordinal, handle) -> [base pointer, users]

    def open(self, ordinal: int, handle: bytes, what: str) -> int:
        """The base address of the block `handle` names, mapped on device `ordinal`; one more user.
        Raises InvalidArgument naming `what` when CUDA refuses the handle."""
        key = (ordinal, bytes(handle))
        with self._lock:
            held = self._open.get(key)
            if held is not None:
                held[1] += 1
                return held[0]
            with cp.cuda.Device(ordinal):
                try:
                    base = cp.cuda.runtime.ipcOpenMemHandle(bytes(handle))
                except cp.cuda.runtime.CUDARuntimeError as exc:
                    raise InvalidArgument(f"{what}.handle cannot be opened on CUDA device {ordinal}: {exc}; send the "
                                          f"handle of a live allocation of a process on this machine") from None
            self._open[key] = [base, 1]
            return base

    def release(self, ordinal: int, handle: bytes) -> None:
        key = (ordinal, bytes(handle))
        with self._lock:
            held = self._open.get(key)
            if held is None:
                return
            held[1] -= 1
            if held[1] > 0:
                return
            del self._open[key]
            with cp.cuda.Device(ordinal):
                try:
                    cp.cuda.runtime.ipcCloseMemHandle(held[0])
                except cp.cuda.runtime.CUDARuntimeError as exc:  # the trainer's process may be gone already
                    log.warning("closing a CUDA IPC mapping on device %d failed: %s", ordinal, exc)

    def __len__(self) -> int:
        return len(self._open)


@dataclasses.dataclass
class SharedBuffer:
    """One of a region's buffers in a trainer's memory, as this process sees it."""

    handle: bytes
    ptr: int  # the buffer's first byte (block base + offset)
    nbytes: int


def check_bounds(buffer: SharedBuffer, base: int, needed: int, what: str) -> None:
    """The `needed` bytes from the buffer's start must lie inside the block the handle opened."""
    span = allocation_range(base)
    if span is None:
        return  # the driver cannot tell; the client's size was checked by the store
    block, size = span
    if buffer.ptr < block or buffer.ptr + needed > block + size:
        raise InvalidArgument(f"{what}.offset_bytes {buffer.ptr - base} plus the region's {needed} bytes runs past "
                              f"the end of the shared allocation ({size} bytes)")


class PageBuffer:
    """A device buffer that holds one page (a staging slot or a GPU cache slot), and its three events
    (Note [page buffer events])."""

    def __init__(self, nbytes: int):
        self.memory = cp.cuda.Memory(nbytes)  # cudaMalloc, freed when the object goes: never pooled by CuPy
        self.ptr = self.memory.ptr
        self.nbytes = nbytes
        self.copied_in = cp.cuda.Event(disable_timing=True)
        self.used = cp.cuda.Event(disable_timing=True)
        self.copied_out = cp.cuda.Event(disable_timing=True)


class SlotPool:
    """The GPU cache slots of one device, shared by the sessions on it.

    At most `capacity` buffers ever exist, so the cache's memory is fixed whatever the model's size.
    Buffers are made on first use and kept when given back; `trim` frees the idle ones.
    """

    def __init__(self, ordinal: int, slot_bytes: int, capacity: int):
        self.ordinal = ordinal
        self.slot_bytes = slot_bytes
        self.capacity = capacity
        self._lock = threading.Lock()
        self._free: list[PageBuffer] = []
        self._made = 0

    def take(self) -> PageBuffer | None:
        """A free slot, or None when every slot is in use (running out of room is not an error)."""
        with self._lock:
            if self._free:
                return self._free.pop()
            if self._made >= self.capacity:
                return None
            self._made += 1
        try:
            with cp.cuda.Device(self.ordinal):
                return PageBuffer(self.slot_bytes)
        except cp.cuda.runtime.CUDARuntimeError as exc:
            with self._lock:
                self._made -= 1
            if exc.status != CUDA_ERROR_MEMORY_ALLOCATION:
                raise
            log.warning("device %d: no memory for a GPU cache slot of %d bytes; the page streams instead",
                        self.ordinal, self.slot_bytes)
            return None

    def give(self, buffer: PageBuffer) -> None:
        with self._lock:
            self._free.append(buffer)

    @property
    def in_use(self) -> int:
        with self._lock:
            return self._made - len(self._free)

    def trim(self) -> None:
        """Frees the slots nobody holds (their work is finished: sessions synchronise before giving back)."""
        with self._lock:
            idle, self._free = self._free, []
            self._made -= len(idle)
        with cp.cuda.Device(self.ordinal):
            del idle
