"""Which per-tensor state the CUDA kernels keep resident on the device: a tensor's StTensor shape class
(kind, rows, cols, lead) and its small buffers, per algorithm (cuda/README.md). Pure: no CUDA needed.

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

MAX_RUNS = 8  # ST_MAX_RUNS in slimadam.cu


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


def _factored(shape: tuple[int, ...]) -> tuple[int, int, int]:
    n, m = shape[-2], shape[-1]
    return n, m, math.prod(shape[:-2])


def _runs(shape: tuple[int, ...], rule: tuple[int, ...]) -> list[tuple[bool, int]]:
    """The shape collapsed into runs of consecutive dims all in K or all out of it: (in K, size)."""
    runs: list[tuple[bool, int]] = []
    for d, size in enumerate(shape):
        in_k = d in rule
        if runs and runs[-1][0] == in_k:
            runs[-1] = (in_k, runs[-1][1] * size)
        else:
            runs.append((in_k, size))
    return runs


def small_plan(source: str, kernel_state: torch.dtype, info: TensorInfo, small: Mapping[str, Any]) -> SmallPlan:
    """The shape class and small buffers of a tensor for the kernels of `source` (a cuda_sources name)
    whose state is `kernel_state`, checked against the CPU module's small state (keys, shapes, dtypes)."""
    shape = tuple(info.shape)
    S, f32, f64 = kernel_state, torch.float32, torch.float64
    if source == "adamw8bit":
        from stated_kernels.adamw8bit import is_quantized

        return SmallPlan(kind=1 if is_quantized(info.numel) else 0)
    if source == "adafactor":
        if len(shape) < 2:
            return SmallPlan(slots=(SmallSlot(3, None, f64, 4),))
        n, m, lead = _factored(shape)
        slots = (SmallSlot(0, "row_var", S, lead * n), SmallSlot(1, "col_var", S, lead * m),
                 SmallSlot(2, None, f32, lead), SmallSlot(3, None, f64, 4))
        return _checked(source, SmallPlan(1, n, m, lead, slots), info, small)
    if source == "came":
        if len(shape) < 2:
            return SmallPlan(slots=(SmallSlot(6, None, f64, 4),))
        n, m, lead = _factored(shape)
        slots = (SmallSlot(0, "exp_avg_sq_row", S, lead * n), SmallSlot(1, "exp_avg_sq_col", S, lead * m),
                 SmallSlot(2, "exp_avg_res_row", S, lead * n), SmallSlot(3, "exp_avg_res_col", S, lead * m),
                 SmallSlot(4, None, f32, 2 * lead), SmallSlot(5, None, f64, lead * (n + m)),
                 SmallSlot(6, None, f64, 4))
        return _checked(source, SmallPlan(1, n, m, lead, slots), info, small)
    if source == "slimadam" and "nu" in small:
        return _checked(source, slim_plan(shape, tuple(small["_rule"]), kernel_state), info, small)
    return SmallPlan()


def slim_plan(shape: tuple[int, ...], rule: tuple[int, ...], kernel_state: torch.dtype) -> SmallPlan:
    """SlimAdam's compressed second moment: shape class 1 when the dims averaged away form one run,
    class 2 (with the runs as int64 constants) otherwise."""
    runs = _runs(shape, rule)
    nu = math.prod(size for in_k, size in runs if not in_k)
    kcount = math.prod(size for in_k, size in runs if in_k)
    in_k = [i for i, (k, _) in enumerate(runs) if k]
    if len(in_k) == 1:
        r = in_k[0]
        outer = math.prod(size for _, size in runs[:r])
        inner = math.prod(size for _, size in runs[r + 1:])
        return SmallPlan(1, kcount, inner, outer, (SmallSlot(0, "nu", kernel_state, nu),))
    if len(runs) > MAX_RUNS:
        raise ValueError(f"slimadam: compress_dims {rule} cut shape {shape} into {len(runs)} runs of dims; "
                         f"the CUDA kernels take at most {MAX_RUNS}")
    mask = sum(1 << i for i in in_k)
    const = (len(runs), mask, *(size for _, size in runs))
    return SmallPlan(2, kcount, 1, nu, (SmallSlot(0, "nu", kernel_state, nu),
                                       SmallSlot(1, None, torch.int64, len(const), const)))


def _checked(source: str, plan: SmallPlan, info: TensorInfo, small: Mapping[str, Any]) -> SmallPlan:
    for slot in plan.slots:
        if slot.key is None:
            continue
        value = small.get(slot.key)
        if value is None:
            raise ValueError(f"{source}: tensor {info.index} has no small state {slot.key!r}")
        if value.dtype != slot.dtype or value.numel() != slot.count:
            raise ValueError(f"{source}: small state {slot.key!r} of tensor {info.index} is {value.dtype} "
                             f"x {value.numel()}, the CUDA kernels take {slot.dtype} x {slot.count}")
    return plan
