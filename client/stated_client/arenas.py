"""Views of the arenas: each parameter (and its gradient) becomes a slice of the arena the daemon placed it
in (the arenas come from stated_client.arena_receiving, or stated_client.device_buffers on CUDA).
"""

from __future__ import annotations

import torch


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
