"""Slots of host memory that hold resident pages.

Every slot is its own anonymous mapping, so it is page-aligned (O_DIRECT needs 4096-byte alignment)
and can be given back to the system when a budget shrinks. The pool only hands out and takes back
slots; which page sits in which slot is the page table's business.

When a session's pages feed a GPU, its pager hands the pool the backend as `pinner`
(Pager.pin_host_pages): every slot is page-locked (cudaHostRegister), those that exist at once and the
rest as they are created, so that copies to and from the device run asynchronously at the link's full
speed. The pool never imports a CUDA library itself.
"""

from __future__ import annotations

import mmap
from typing import Protocol

import torch

from stated.paging.state_file import DIRECT_ALIGN, align_up


class Pinner(Protocol):
    """Page-locks host memory for a device (the CUDA backend)."""

    def pin_host(self, address: int, nbytes: int) -> None: ...

    def unpin_host(self, address: int) -> None: ...


class HostPool:
    def __init__(self, slot_bytes: int, capacity: int, pinner: Pinner | None = None):
        self.slot_bytes = align_up(max(slot_bytes, 1), DIRECT_ALIGN)
        self.capacity = capacity
        self.pinner = pinner
        self._pinned: set[int] = set()
        self._buffers: dict[int, torch.Tensor] = {}
        self._maps: dict[int, mmap.mmap] = {}
        self._free: list[int] = []
        self._next = 0

    @property
    def in_use(self) -> int:
        return len(self._buffers) - len(self._free)

    @property
    def allocated_bytes(self) -> int:
        return len(self._buffers) * self.slot_bytes

    def acquire(self) -> int | None:
        """A free slot, or None when the pool is at capacity (running out of room is not an error)."""
        if self._free:
            return self._free.pop()
        if len(self._buffers) >= self.capacity:
            return None
        slot = self._next
        self._next += 1
        mm = mmap.mmap(-1, self.slot_bytes)
        self._maps[slot] = mm
        self._buffers[slot] = torch.frombuffer(mm, dtype=torch.uint8)
        self._pin(slot)
        return slot

    def set_pinner(self, pinner: Pinner) -> None:
        """Page-locks every slot with `pinner`, those made so far and those to come."""
        self.pinner = pinner
        for slot in self._buffers:
            self._pin(slot)

    def _pin(self, slot: int) -> None:
        if self.pinner is not None and slot not in self._pinned:
            self.pinner.pin_host(self._buffers[slot].data_ptr(), self.slot_bytes)
            self._pinned.add(slot)

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def buffer(self, slot: int) -> torch.Tensor:
        return self._buffers[slot]

    def resize(self, capacity: int) -> None:
        """Changes how many slots may be in use; frees idle slots above the new capacity."""
        self.capacity = capacity
        while len(self._buffers) > capacity and self._free:
            self._drop(self._free.pop())

    def _drop(self, slot: int) -> None:
        buf = self._buffers.pop(slot)
        if slot in self._pinned:
            self._pinned.discard(slot)
            self.pinner.unpin_host(buf.data_ptr())
        del buf
        mm = self._maps.pop(slot)
        try:
            mm.close()
        except BufferError:
            pass

    def close(self) -> None:
        for slot in list(self._buffers):
            self._drop(slot)
        self._free.clear()
