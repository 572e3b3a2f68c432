r"""Adafactor, following torch.optim.Adafactor (torch 2.13; ALGORITHMS.md section 4.1).

Per step, for every tensor with a gradient (t counted per tensor from 1; no first moment, no bias
correction; g <- -g if maximize):

    w     = t^beta2_decay                         (plays 1 - beta2_t; w = 1 at t = 1)
    rho   = min(lr, 1 / sqrt(t))
    alpha = max(eps2, RMS(theta)) * rho           (RMS = ||theta||_2 / sqrt(numel), before the decay)
    theta <- theta * (1 - lr * lambda)            (decoupled, with the group lr)
    ndim >= 2, shape (..., n, m), factored over the last two dims:
        R <- lerp(R, mean_{-1}(g^2), w)           R: (..., n, 1)   `row_var`
        C <- lerp(C, mean_{-2}(g^2), w)           C: (..., 1, m)   `col_var`
        Vhat = (R * C) / max(mean_{-2}(R), eps1)
    ndim <= 1:
        V <- lerp(V, g^2, w);  Vhat = V                             `variance`
    U     = g * rsqrt(max(Vhat, eps1^2))
    theta <- theta - alpha / max(1, RMS(U) / d) * U

eps1 defaults to torch's None, finfo(dtype).eps; on the wire a negative eps1 means None. eps2 is the
second entry of torch's `eps` tuple.

Layout and passes. R and C are small and stay resident; V is elementwise and paged. RMS(theta) and,
for factored tensors, R, C and RMS(U) are computed in `prepass` over the whole tensor with the
reference's operations. For 1-D tensors RMS(U) needs the new V, which lives in pages, so the
algorithm takes two passes: pass 0 updates V and folds sum(U^2) into a float64 accumulator in page
order (a strict left fold, so every segmentation gives the same bits); pass 1 moves theta, where U is
recomputed elementwise from the stored V. Factored tensors do nothing in pass 0.

Broadcast state reaches a segment through `expand_slice`, the segment's part of the small tensor
expanded to the tensor's shape; CAME and SlimAdam use it too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from stated_kernels.cuda_small import SmallPlan, SmallSlot, checked, factored
from stated_kernels.cuda_spec import MAXIMIZE, CudaSpec, Schedule, fields_slots
from stated_kernels.cuda_tables import hi_lo
from stated_kernels.spec import (
    Algorithm,
    FieldSpec,
    HyperSpec,
    Hyperparameters,
    Segment,
    TensorInfo,
    decay_scalar,
    non_negative,
    weight_decay,
)


def expand_slice(small: torch.Tensor, shape: Sequence[int], start: int, length: int,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """A new tensor holding `small.expand(shape).reshape(-1)[start:start + length]` (small has
    shape's rank and broadcasts to it), without expanding the whole tensor: whole rows of the
    leading dim are copied at once, the partial rows at either end recursively."""
    out = torch.empty(length, dtype=small.dtype) if out is None else out
    if not shape:
        return out.copy_(small.reshape(1))
    inner = math.prod(shape[1:])
    row, offset = divmod(start, inner)
    pick = (lambda r: small[0]) if small.shape[0] == 1 else (lambda r: small[r])
    done = 0
    if offset:
        head = min(inner - offset, length)
        expand_slice(pick(row), shape[1:], offset, head, out[:head])
        row, done = row + 1, head
    rows = (length - done) // inner
    if rows:
        block = small if small.shape[0] == 1 else small[row: row + rows]
        out[done: done + rows * inner].view(rows, *shape[1:]).copy_(block.expand(rows, *shape[1:]))
        row, done = row + rows, done + rows * inner
    if done < length:
        expand_slice(pick(row), shape[1:], 0, length - done, out[done:])
    return out


def broadcast_index(shape: Sequence[int], small_shape: Sequence[int], start: int, length: int) -> torch.Tensor:
    """Flat indices into a tensor of `small_shape` for the elements [start, start + length) of
    `shape` flattened, as `expand_slice` lays them out."""
    return expand_slice(torch.arange(math.prod(small_shape)).view(small_shape), shape, start, length)


def fold_into(acc: torch.Tensor, index: torch.Tensor | None, values: torch.Tensor) -> None:
    """acc[index[k]] += values[k] in float64, one k after another (index None: all into acc[0]): a
    left fold in element order, so folding a tensor's segments in order gives the same bits however
    it is cut."""
    if index is None:
        index = torch.zeros(values.numel(), dtype=torch.long)
    acc.index_add_(0, index, values.double())


def is_factored(tensor: TensorInfo) -> bool:
    return len(tensor.shape) >= 2


def row_shape(shape: Sequence[int]) -> tuple[int, ...]:
    return (*shape[:-1], 1)


def col_shape(shape: Sequence[int]) -> tuple[int, ...]:
    return (*shape[:-2], 1, shape[-1])


def factored_bytes(shape: Sequence[int]) -> int:
    """fp32 bytes of a factored second moment: a row and a column per leading index (1-D and 0-D
    tensors: one value per element)."""
    n = math.prod(shape)
    if len(shape) < 2:
        return 4 * n
    rows, cols = shape[-2], shape[-1]
    return 4 * (n // (rows * cols) if rows * cols else 0) * (rows + cols)


def non_positive(value: float) -> str | None:
    return None if value <= 0 else f"must be <= 0, got {value}"


def at_least_one(value: float) -> str | None:
    return None if value >= 1 else f"must be >= 1, got {value}"


class Adafactor(Algorithm):
    name = "adafactor"
    passes = 2
    hyperparameters = (
        HyperSpec("lr", 1e-2, check=non_negative),
        HyperSpec("beta2_decay", -0.8, check=non_positive),
        HyperSpec("eps1", -1.0, key="eps", index=0, none_as=-1.0),  # negative: torch's None, finfo(dtype).eps
        HyperSpec("eps2", 1e-3, check=non_negative, key="eps", index=1),
        HyperSpec("d", 1.0, check=at_least_one),
        weight_decay(0.0),
        HyperSpec("maximize", False, is_flag=True),
    )

    cuda = CudaSpec(
        "adafactor.cu",
        Schedule(("stated_adafactor_page0", "stated_adafactor_page1"),
                 prepass=("stated_adafactor_rows", "stated_adafactor_cols", "stated_adafactor_row_mean",
                          "stated_adafactor_norms", "stated_adafactor_finish"),
                 between=(("stated_adafactor_between",),)),
        fields_slots("variance"),
        single_block=frozenset({"stated_adafactor_finish", "stated_adafactor_between"}))

    def page_fields(self, tensor: TensorInfo, hp: Hyperparameters) -> tuple[FieldSpec, ...]:
        return () if is_factored(tensor) else (FieldSpec("variance", tensor.dtype),)

    def init_small_state(self, tensor: TensorInfo, hp: Hyperparameters) -> dict[str, Any]:
        small = super().init_small_state(tensor, hp)
        if is_factored(tensor):
            small["row_var"] = torch.zeros(row_shape(tensor.shape), dtype=tensor.dtype)
            small["col_var"] = torch.zeros(col_shape(tensor.shape), dtype=tensor.dtype)
        return small

    # --- the step -----------------------------------------------------------------------------

    def formed_scalars(self, hp: Hyperparameters) -> list[tuple[str, float]]:
        eps1 = float(hp["eps1"])
        return [decay_scalar(hp)] + ([("eps1 * eps1", eps1 * eps1)] if eps1 >= 0 else [])

    def prepass(self, tensor: TensorInfo, param: torch.Tensor, grad: torch.Tensor,
                small: dict[str, Any], hp: Hyperparameters) -> None:
        if tensor.numel == 0:
            return  # Note [empty tensors]: torch's RMS(theta) divides by zero here
        # With master weights the arenas are 16-bit while the tensor registered as float32.
        param, grad = param.to(tensor.dtype), grad.to(tensor.dtype)
        t = float(small["step"])
        small["_w"] = t ** float(hp["beta2_decay"])
        rho = min(float(hp["lr"]), 1 / (t**0.5))
        small["_alpha"] = max(float(hp["eps2"]), param.norm(2).item() / (param.numel() ** 0.5)) * rho
        eps1 = float(hp["eps1"]) if hp["eps1"] >= 0 else torch.finfo(param.dtype).eps
        small["_eps1"] = eps1
        if not is_factored(tensor):
            small["_sum_u2"] = torch.zeros(1, dtype=torch.float64)
            return
        g = -grad if hp["maximize"] else grad
        # The reference's reductions: mean(g^2) as a squared norm over the size.
        small["row_var"].lerp_(torch.norm(g, dim=-1, keepdim=True).square_().div_(g.size(-1)), small["_w"])
        small["col_var"].lerp_(torch.norm(g, dim=-2, keepdim=True).square_().div_(g.size(-2)), small["_w"])
        small["_row_norm"] = small["row_var"].mean(dim=-2, keepdim=True).clamp_(min=eps1)
        u = (small["row_var"] * small["col_var"]).div_(small["_row_norm"]).clamp_(min=eps1 * eps1).rsqrt_()
        u.mul_(g)
        self._set_step_size(small, u.norm(2).item(), tensor.numel, hp)

    @staticmethod
    def _set_step_size(small: dict[str, Any], norm_u: float, numel: int, hp: Hyperparameters) -> None:
        denom = max(1.0, norm_u / ((numel**0.5) * float(hp["d"])))
        small["_step_size"] = -small["_alpha"] / denom

    def update(self, segments: Sequence[Segment], hp: Hyperparameters, pass_index: int = 0) -> None:
        lr, decay = float(hp["lr"]), float(hp["weight_decay"])
        for s in segments:
            factored = is_factored(s.tensor)
            if pass_index == 0 and factored:
                continue
            g = -s.grad if hp["maximize"] else s.grad
            eps1 = s.small["_eps1"]
            if factored:
                shape, start, length = s.tensor.shape, s.start, s.length
                u = expand_slice(s.small["row_var"], shape, start, length)
                u.mul_(expand_slice(s.small["col_var"], shape, start, length))
                u.div_(expand_slice(s.small["_row_norm"], shape, start, length))
            else:
                variance = s.fields["variance"]
                if pass_index == 0:
                    variance.lerp_(g * g, s.small["_w"])
                u = variance.clone()
            u = u.clamp_(min=eps1 * eps1).rsqrt_().mul_(g)
            if pass_index == 0:
                fold_into(s.small["_sum_u2"], None, u.double().square())
                continue
            if decay != 0:
                s.param.mul_(1 - lr * decay)
            s.param.add_(u, alpha=s.small["_step_size"])

    def between_passes(self, tensor: TensorInfo, small: dict[str, Any], hp: Hyperparameters,
                       pass_index: int) -> None:
        if not is_factored(tensor) and tensor.numel:  # Note [empty tensors]
            self._set_step_size(small, math.sqrt(float(small["_sum_u2"])), tensor.numel, hp)

    # --- CUDA and planning ---------------------------------------------------------------------

    def cuda_flags(self, hp: Hyperparameters) -> int:
        return MAXIMIZE if hp.get("maximize") else 0

    def cuda_scalars(self, hp: Hyperparameters, step: float, *, numel: int, ndim: int, dtype: str) -> list[float]:
        lr, wd = float(hp.get("lr", 0.0)), float(hp.get("weight_decay", 0.0))
        eps1 = float(hp.get("eps1", -1.0))
        if eps1 < 0:  # torch's None: finfo(dtype).eps
            eps1 = {"float32": 2.0**-23, "bfloat16": 2.0**-7, "float16": 2.0**-10}[dtype]
        return [step ** float(hp.get("beta2_decay", -0.8)), eps1, eps1 * eps1, 1 - lr * wd, wd,
                *hi_lo(min(lr, 1 / step ** 0.5)), *hi_lo(float(hp.get("eps2", 1e-3))), *hi_lo(float(hp.get("d", 1.0)))]

    def cuda_small(self, tensor: TensorInfo, kernel_state: torch.dtype, small: dict[str, Any]) -> SmallPlan:
        scratch = SmallSlot(3, None, torch.float64, 4)
        if not is_factored(tensor):
            return SmallPlan(slots=(scratch,))
        n, m, lead = factored(tensor.shape)
        slots = (SmallSlot(0, "row_var", kernel_state, lead * n), SmallSlot(1, "col_var", kernel_state, lead * m),
                 SmallSlot(2, None, torch.float32, lead), scratch)
        return checked(self.name, SmallPlan(1, n, m, lead, slots), tensor, small)

    def state_bytes(self, shape: tuple[int, ...], name: str = "") -> int:
        return factored_bytes(shape)

    # --- state_dict ---------------------------------------------------------------------------

    def export_state(self, tensor: TensorInfo, small: dict[str, Any],
                     paged: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        entry = {"step": small["step"].clone()}
        if is_factored(tensor):
            entry["row_var"], entry["col_var"] = small["row_var"].clone(), small["col_var"].clone()
        else:
            entry["variance"] = paged["variance"].reshape(tensor.shape)
        return entry

    def import_state(self, tensor: TensorInfo, small: dict[str, Any], entry: dict[str, torch.Tensor],
                     fields: Sequence[FieldSpec]) -> dict[str, torch.Tensor]:
        if is_factored(tensor):
            for key, shape in (("row_var", row_shape(tensor.shape)), ("col_var", col_shape(tensor.shape))):
                if key not in entry:
                    raise ValueError(f"state of tensor {tensor.index} has no {key!r}")
                if tuple(entry[key].shape) != shape:
                    raise ValueError(f"state {key!r} of tensor {tensor.index} has shape {tuple(entry[key].shape)}, "
                                     f"expected {shape}")
            small["row_var"].copy_(entry["row_var"])
            small["col_var"].copy_(entry["col_var"])
        return super().import_state(tensor, small, entry, fields)


# The specs this module registers (stated_kernels.MODULES).
SPECS = (Adafactor(),)
