"""The per-tensor state the CUDA kernels keep resident on the device: a tensor's StTensor shape class
(kind, rows, cols, lead) and its small buffers (cuda/README.md). Pure: no CUDA needed.

Each algorithm says what its tensors need (`Algorithm.cuda_small`, built from these pieces);
stated_kernels.cuda_runner asks for a tensor's plan, copies the CPU module's small state into the
plan's buffers and hands their addresses to the kernels.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch

from stated_kernels.spec import TensorInfo


@dataclasses.dataclass(frozen=True)
class SmallSlot:
    """One resident per-tensor buffer the kernels read through StTensor.small[slot]."""

    slot: int
    key: str | None  # the CPU module's small-state key; None: scratch (any contents)
    dtype: torch.dtype
    count: int
    const: tuple[int, ...] | None = None  # fixed int64 contents (SlimAdam's runs)


@dataclasses.dataclass(frozen=True)
class SmallPlan:
    """A tensor's StTensor shape class (kind, rows, cols, lead) and its small buffers."""

    kind: int = 0
    rows: int = 0
    cols: int = 0
    lead: int = 0
    slots: tuple[SmallSlot, ...] = ()


@dataclasses.dataclass
class DeviceSmall:
    """A tensor's small buffers on the device (CuPy arrays by slot) and their addresses."""

    plan: SmallPlan
    arrays: dict[int, Any]
    pointers: list[int]


def factored(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(rows, cols, lead) of a tensor whose last two dims are factored (Adafactor, CAME)."""
    n, m = shape[-2], shape[-1]
    return n, m, math.prod(shape[:-2])


def checked(algorithm: str, plan: SmallPlan, info: TensorInfo, small: Mapping[str, Any]) -> SmallPlan:
    """`plan`, once its keyed slots are found to match the CPU module's small state (keys, dtypes, sizes)."""
    for slot in plan.slots:
        if slot.key is None:
            continue
        value = small.get(slot.key)
        if value is None:
            raise ValueError(f"{algorithm}: tensor {info.index} has no small state {slot.key!r}")
        if value.dtype != slot.dtype or value.numel() != slot.count:
            raise ValueError(f"{algorithm}: small state {slot.key!r} of tensor {info.index} is {value.dtype} "
                             f"x {value.numel()}, the CUDA kernels take {slot.dtype} x {slot.count}")
    return plan
