r"""CAME, following came-pytorch 0.1.3 `CAME` (ALGORITHMS.md section 5; Luo et al. 2023).

Per step, for every tensor with a gradient (gradients in float32; no bias correction, constant betas):

    u = g^2 + eps1
    ndim >= 2, shape (..., n, m), factored over the last two dims:
        R <- beta2 * R + (1 - beta2) * mean_{-1}(u)           `exp_avg_sq_row`  (..., n)
        C <- beta2 * C + (1 - beta2) * mean_{-2}(u)           `exp_avg_sq_col`  (..., m)
        U = g * rsqrt(R / mean(R)) (x) rsqrt(C)
    ndim <= 1:
        V <- beta2 * V + (1 - beta2) * u                      `exp_avg_sq`
        U = g * rsqrt(V)
    U <- U / max(1, RMS(U) / clip_threshold)                  (RMS per tensor)
    M <- beta1 * M + (1 - beta1) * U                          `exp_avg`
    factored: res = (U - M)^2 + eps2                          (with the new M)
        S_R <- beta3 * S_R + (1 - beta3) * mean_{-1}(res)     `exp_avg_res_row`
        S_C <- beta3 * S_C + (1 - beta3) * mean_{-2}(res)     `exp_avg_res_col`
        update = M * rsqrt(S_R / mean(S_R)) (x) rsqrt(S_C)
    ndim <= 1: update = M
    theta <- theta - lambda * lr * theta                      (decoupled, despite the docstring)
    theta <- theta - lr * update

lr has no default (came-pytorch requires it). eps1, eps2 are the reference's `eps` tuple and beta1..3
its `betas`.

Layout and passes. R, C, S_R, S_C are small and resident; M (and V for 1-D tensors) are paged, in
float32. `prepass` computes the new R, C and, for factored tensors, RMS(U) with the reference's
operations over the whole gradient. CAME needs the new M over the whole tensor before its statistics,
so it takes two passes:

- pass 0: factored: U and the new M; the means of res are folded, in float64, into per-row and
  per-column sums in element order (a strict left fold, so any segmentation gives the same bits).
  1-D: the new V and a fold of sum(U^2).
- `between_passes`: the new S_R and S_C from the folded sums (factored), or RMS(U) (1-D).
- pass 1: factored: the update from M; 1-D: U again from the stored V, the new M, the update.
The mean of res is the float64 sum over the count, rounded once, where the reference takes a float32
mean: the two can differ in the last bit, so CAME follows the reference within a tolerance.

The reference's `RMS` state entry (RMS of theta, never read) is not kept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from stated_kernels.adafactor import (
    broadcast_index,
    col_shape,
    expand_slice,
    factored_bytes,
    fold_into,
    is_factored,
    row_shape,
)
from stated_kernels.cuda_small import SmallPlan, SmallSlot, checked, factored
from stated_kernels.cuda_spec import FLOAT_STATE_PAIRS, CudaSpec, Schedule, fields_slots
from stated_kernels.lion import closed_unit_interval
from stated_kernels.spec import (
    Algorithm,
    FieldSpec,
    HyperSpec,
    Hyperparameters,
    Segment,
    TensorInfo,
    decay_scalar,
    non_negative,
    positive,
    weight_decay,
)

FACTORED_KEYS = ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_res_row", "exp_avg_res_col")


def _factors(row: torch.Tensor, col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's rsqrt(R / mean(R)) and rsqrt(C), kept apart (their outer product is formed per
    segment)."""
    return (row / row.mean(dim=-1, keepdim=True)).rsqrt_(), col.rsqrt()


def _small_shapes(shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    return {"exp_avg_sq_row": shape[:-1], "exp_avg_sq_col": (*shape[:-2], shape[-1]),
            "exp_avg_res_row": shape[:-1], "exp_avg_res_col": (*shape[:-2], shape[-1])}


class CAME(Algorithm):
    name = "came"
    passes = 2
    hyperparameters = (
        HyperSpec("lr", None, check=positive),
        HyperSpec("eps1", 1e-30, check=non_negative, key="eps", index=0),
        HyperSpec("eps2", 1e-16, check=non_negative, key="eps", index=1),
        HyperSpec("clip_threshold", 1.0, check=positive),
        HyperSpec("beta1", 0.9, check=closed_unit_interval, key="betas", index=0),
        HyperSpec("beta2", 0.999, check=closed_unit_interval, key="betas", index=1),
        HyperSpec("beta3", 0.9999, check=closed_unit_interval, key="betas", index=2),
        weight_decay(0.0),
    )
    # CAME keeps float32 state whatever the parameter.
    cuda = CudaSpec(
        "came.cu",
        Schedule(("stated_came_page0", "stated_came_page1"),
                 prepass=("stated_came_rows", "stated_came_cols", "stated_came_row_mean", "stated_came_norms",
                          "stated_came_finish"),
                 between=(("stated_came_between", "stated_came_between_mean"),)),
        fields_slots("exp_avg", "exp_avg_sq"),
        pairs=FLOAT_STATE_PAIRS, single_block=frozenset({"stated_came_finish"}), float_state=True)

    def page_fields(self, tensor: TensorInfo, hp: Hyperparameters) -> tuple[FieldSpec, ...]:
        fields = (FieldSpec("exp_avg", torch.float32),)
        return fields if is_factored(tensor) else fields + (FieldSpec("exp_avg_sq", torch.float32),)

    def init_small_state(self, tensor: TensorInfo, hp: Hyperparameters) -> dict[str, Any]:
        small = super().init_small_state(tensor, hp)
        if is_factored(tensor):
            for key, shape in _small_shapes(tensor.shape).items():
                small[key] = torch.zeros(shape, dtype=torch.float32)
        return small

    # --- the step -----------------------------------------------------------------------------

    def formed_scalars(self, hp: Hyperparameters) -> list[tuple[str, float]]:
        return [decay_scalar(hp)]

    def prepass(self, tensor: TensorInfo, param: torch.Tensor, grad: torch.Tensor,
                small: dict[str, Any], hp: Hyperparameters) -> None:
        if tensor.numel == 0:
            return  # Note [empty tensors]: the means over an empty dim would be nan
        if not is_factored(tensor):
            small["_sum_u2"] = torch.zeros(1, dtype=torch.float64)
            return
        beta2 = float(hp["beta2"])
        g = grad.float()
        u = (g**2) + float(hp["eps1"])
        small["exp_avg_sq_row"].mul_(beta2).add_(u.mean(dim=-1), alpha=1.0 - beta2)
        small["exp_avg_sq_col"].mul_(beta2).add_(u.mean(dim=-2), alpha=1.0 - beta2)
        rows, cols = _factors(small["exp_avg_sq_row"], small["exp_avg_sq_col"])
        u = torch.mul(rows.unsqueeze(-1), cols.unsqueeze(-2)).mul_(g)
        small["_divisor"] = (u.norm(2) / (u.numel() ** 0.5) / float(hp["clip_threshold"])).clamp_(min=1.0)
        small["_u_rows"], small["_u_cols"] = rows, cols
        small["_res_row_sum"] = torch.zeros(small["exp_avg_res_row"].numel(), dtype=torch.float64)
        small["_res_col_sum"] = torch.zeros(small["exp_avg_res_col"].numel(), dtype=torch.float64)

    def update(self, segments: Sequence[Segment], hp: Hyperparameters, pass_index: int = 0) -> None:
        beta1, beta2 = float(hp["beta1"]), float(hp["beta2"])
        for s in segments:
            g = s.grad.float()
            m = s.fields["exp_avg"]
            if is_factored(s.tensor):
                shape, start, length = s.tensor.shape, s.start, s.length
                rows, cols = ("_u_rows", "_u_cols") if pass_index == 0 else ("_res_rows", "_res_cols")
                u = expand_slice(s.small[rows].unsqueeze(-1), shape, start, length)
                u.mul_(expand_slice(s.small[cols].unsqueeze(-2), shape, start, length))
                if pass_index == 0:
                    u.mul_(g).div_(s.small["_divisor"])
                    m.mul_(beta1).add_(u, alpha=1 - beta1)
                    res = (u - m) ** 2 + float(hp["eps2"])
                    fold_into(s.small["_res_row_sum"], broadcast_index(shape, row_shape(shape), start, length), res)
                    fold_into(s.small["_res_col_sum"], broadcast_index(shape, col_shape(shape), start, length), res)
                    continue
                update = u.mul_(m)
            else:
                v = s.fields["exp_avg_sq"]
                if pass_index == 0:
                    v.mul_(beta2).add_((g**2) + float(hp["eps1"]), alpha=1.0 - beta2)
                u = v.rsqrt().mul_(g)
                if pass_index == 0:
                    fold_into(s.small["_sum_u2"], None, u.double().square())
                    continue
                u.div_(s.small["_divisor"])
                m.mul_(beta1).add_(u, alpha=1 - beta1)
                update = m.clone()
            self._apply(s.param, update, hp)

    @staticmethod
    def _apply(param: torch.Tensor, update: torch.Tensor, hp: Hyperparameters) -> None:
        lr, decay = float(hp["lr"]), float(hp["weight_decay"])
        if decay != 0:
            param.add_(param, alpha=-decay * lr)
        update.mul_(lr)
        param.add_(-update)

    def between_passes(self, tensor: TensorInfo, small: dict[str, Any], hp: Hyperparameters,
                       pass_index: int) -> None:
        if tensor.numel == 0:
            return  # Note [empty tensors]
        if not is_factored(tensor):
            # The reference's RMS: a float32 norm over sqrt(numel), clipped.
            norm = torch.tensor(math.sqrt(float(small["_sum_u2"])), dtype=torch.float32)
            small["_divisor"] = (norm / (tensor.numel**0.5) / float(hp["clip_threshold"])).clamp_(min=1.0)
            return
        beta3 = float(hp["beta3"])
        n, m = tensor.shape[-2], tensor.shape[-1]
        row_mean = (small["_res_row_sum"] / m).float().view(small["exp_avg_res_row"].shape)
        col_mean = (small["_res_col_sum"] / n).float().view(small["exp_avg_res_col"].shape)
        small["exp_avg_res_row"].mul_(beta3).add_(row_mean, alpha=1.0 - beta3)
        small["exp_avg_res_col"].mul_(beta3).add_(col_mean, alpha=1.0 - beta3)
        small["_res_rows"], small["_res_cols"] = _factors(small["exp_avg_res_row"], small["exp_avg_res_col"])

    # --- CUDA and planning ---------------------------------------------------------------------

    def cuda_scalars(self, hp: Hyperparameters, step: float, *, numel: int, ndim: int, dtype: str) -> list[float]:
        lr, wd = float(hp.get("lr", 0.0)), float(hp.get("weight_decay", 0.0))
        b1, b2, b3 = float(hp["beta1"]), float(hp["beta2"]), float(hp["beta3"])
        return [b1, 1 - b1, b2, 1 - b2, b3, 1 - b3, hp.get("eps1", 1e-30), hp.get("eps2", 1e-16),
                hp.get("clip_threshold", 1.0), lr, -wd * lr, wd, numel ** 0.5]

    def cuda_small(self, tensor: TensorInfo, kernel_state: torch.dtype, small: dict[str, Any]) -> SmallPlan:
        scratch = SmallSlot(6, None, torch.float64, 4)
        if not is_factored(tensor):
            return SmallPlan(slots=(scratch,))
        n, m, lead = factored(tensor.shape)
        slots = tuple(SmallSlot(k, key, kernel_state, lead * (n if key.endswith("row") else m))
                      for k, key in enumerate(FACTORED_KEYS))
        slots += (SmallSlot(4, None, torch.float32, 2 * lead), SmallSlot(5, None, torch.float64, lead * (n + m)), scratch)
        return checked(self.name, SmallPlan(1, n, m, lead, slots), tensor, small)

    def state_bytes(self, shape: tuple[int, ...], name: str = "") -> int:
        # exp_avg, plus row/column statistics of the second moment and of the instability term.
        n = math.prod(shape)
        return 4 * n + (2 * factored_bytes(shape) if len(shape) >= 2 else 4 * n)

    # --- state_dict ---------------------------------------------------------------------------

    def export_state(self, tensor: TensorInfo, small: dict[str, Any],
                     paged: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        entry = {"step": small["step"].clone()}
        entry.update({name: flat.reshape(tensor.shape) for name, flat in paged.items()})
        if is_factored(tensor):
            entry.update({key: small[key].clone() for key in FACTORED_KEYS})
        return entry

    def import_state(self, tensor: TensorInfo, small: dict[str, Any], entry: dict[str, torch.Tensor],
                     fields: Sequence[FieldSpec]) -> dict[str, torch.Tensor]:
        if is_factored(tensor):
            for key, shape in _small_shapes(tensor.shape).items():
                if key not in entry:
                    raise ValueError(f"state of tensor {tensor.index} has no {key!r}")
                if tuple(entry[key].shape) != shape:
                    raise ValueError(f"state {key!r} of tensor {tensor.index} has shape {tuple(entry[key].shape)}, "
                                     f"expected {shape}")
            for key in FACTORED_KEYS:
                small[key].copy_(entry[key])
        return super().import_state(tensor, small, entry, fields)


# The specs this module registers (stated_kernels.MODULES).
SPECS = (CAME(),)
