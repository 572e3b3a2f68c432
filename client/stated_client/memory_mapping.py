"""Maps a memory file's descriptor as a flat uint8 tensor without keeping a descriptor open.

Python's mmap.mmap duplicates the descriptor it maps and holds the copy for as long as the mapping
lives; an arena's descriptor left open in a trainer could be opened again through /proc/<pid>/fd by
any process of the trainer's user. So the mapping is made with libc's mmap directly: after it, the
caller closes the descriptor and only the mapping remains, released (munmap) when the last tensor that
views it is gone. The daemon maps its arenas the same way, which also keeps its descriptor count at one
per arena.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import weakref

import torch

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


def map_shared(fd: int, nbytes: int) -> torch.Tensor:
    """A flat uint8 tensor of `nbytes` over `fd`'s first bytes, shared with every other mapping of the file.
    The file must hold at least max(nbytes, 1) bytes; `fd` may be closed right after."""
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    address = _libc.mmap(None, nbytes, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
    if address is None or address == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of {nbytes} bytes failed: {os.strerror(err)}")
    buffer = (ctypes.c_uint8 * nbytes).from_address(address)
    # torch.frombuffer keeps `buffer` alive for as long as any view of the tensor lives; the finalizer
    # runs when the last one goes (or at exit), never while memory is still in use.
    weakref.finalize(buffer, _libc.munmap, address, nbytes)
    return torch.frombuffer(buffer, dtype=torch.uint8, count=nbytes)
