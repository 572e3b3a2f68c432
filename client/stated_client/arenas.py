"""The client's side of the shared-memory arenas: map what the daemon created, make params views of it.

The daemon creates every segment and tells us its name; we only ever open names it gave us, under
/dev/shm, and never unlink them (the daemon does, at detach).
"""

from __future__ import annotations

import mmap
import os

import torch

from stated_client.protocol import PREFIX, SHM_DIR


def map_segment(name: str, nbytes: int) -> torch.Tensor:
    """A flat uint8 tensor over the daemon's segment `name` (the mapping lives as long as its views)."""
    if "/" in name or not name.startswith(PREFIX):
        raise ValueError(f"the daemon sent {name!r}, which is not a stated shared memory segment name")
    fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if size < nbytes:
            raise ValueError(f"segment {name} has {size} bytes, the daemon announced {nbytes}")
        mm = mmap.mmap(fd, max(nbytes, 1), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(mm, dtype=torch.uint8, count=nbytes)


def view(arena: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    """The slice of `arena` at byte `offset` shaped and typed like `like`."""
    nbytes = like.numel() * like.element_size()
    if offset < 0 or offset + nbytes > arena.numel():
        raise ValueError(f"placement at byte {offset} (+{nbytes}) lies outside the {arena.numel()}-byte arena")
    return arena[offset: offset + nbytes].view(like.dtype).view(like.shape)


def is_view_of(tensor: torch.Tensor, target: torch.Tensor) -> bool:
    """Whether `tensor` is exactly `target`'s memory (same start, shape and layout)."""
    return (tensor.data_ptr() == target.data_ptr() and tensor.shape == target.shape
            and tensor.dtype == target.dtype and tensor.is_contiguous())
