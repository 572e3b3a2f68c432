r"""SGD with momentum, dampening and Nesterov, following torch.optim.SGD (ALGORITHMS.md section 2).

Per step, for every tensor with a gradient:

    g <- -g                           if maximize
    g <- g + lambda * theta           if weight_decay != 0 (L2)
    if momentum != 0:
        b <- g                        on the tensor's first step (no dampening then)
        b <- mu * b + (1 - tau) * g   afterwards
        d <- g + mu * b  if nesterov else  b
    else:
        d <- g
    theta <- theta - lr * d

The CPU update uses torch's foreach operations, which run the single-tensor path's operations in the
same order, so the results equal torch.optim.SGD exactly. SGD moves 12-16 bytes per parameter, so
it is bandwidth-bound either way.

State: `momentum_buffer` (paged) only when momentum != 0 at registration; no step counter in the
state_dict (the resident `step` only records whether the buffer exists yet).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from stated_kernels.cuda_spec import MAXIMIZE, NESTEROV, CudaSpec, Schedule, fields_slots
from stated_kernels.spec import (
    Algorithm,
    FieldSpec,
    HyperSpec,
    Hyperparameters,
    Segment,
    TensorInfo,
    non_negative,
    weight_decay,
)


class SGD(Algorithm):
    name = "sgd"
    independent_segments = True  # elementwise; per-tensor state is only read
    hyperparameters = (
        HyperSpec("lr", 1e-3, check=non_negative),
        HyperSpec("momentum", 0.0, check=non_negative),
        HyperSpec("dampening", 0.0),
        weight_decay(0.0),
        HyperSpec("nesterov", False, is_flag=True),
        HyperSpec("maximize", False, is_flag=True),
    )
    cuda = CudaSpec("sgd.cu", Schedule(("stated_sgd",)), fields_slots("momentum_buffer"), rounded_to_state=(0, 1, 2, 3))

    def validate_combination(self, hp: Hyperparameters, where: str) -> str | None:
        if hp.get("nesterov") and (hp.get("momentum", 0) <= 0 or hp.get("dampening", 0) != 0):
            return f"{where}nesterov requires a momentum > 0 and zero dampening"
        return None

    def page_fields(self, tensor: TensorInfo, hp: Hyperparameters) -> tuple[FieldSpec, ...]:
        return (FieldSpec("momentum_buffer", tensor.dtype),) if hp.get("momentum", 0) != 0 else ()

    def update(self, segments: Sequence[Segment], hp: Hyperparameters, pass_index: int = 0) -> None:
        params = [s.param for s in segments]
        grads = [s.grad for s in segments]
        if hp["maximize"]:
            grads = torch._foreach_neg(grads)
        if hp["weight_decay"] != 0:
            grads = torch._foreach_add(grads, params, alpha=hp["weight_decay"])
        momentum = hp["momentum"]
        if momentum != 0:
            if "momentum_buffer" not in segments[0].fields:
                raise ValueError("momentum was 0 at registration, so there is no momentum buffer to use")
            bufs = [s.fields["momentum_buffer"] for s in segments]
            fresh = [float(s.small["step"]) == 1 for s in segments]
            for buf, g, is_first in zip(bufs, grads, fresh):
                if is_first:  # the first step takes the gradient as it is, without dampening
                    buf.copy_(g)
            older = [(b, g) for b, g, is_first in zip(bufs, grads, fresh) if not is_first]
            if older:
                torch._foreach_mul_([b for b, _ in older], momentum)
                torch._foreach_add_([b for b, _ in older], [g for _, g in older], alpha=1 - hp["dampening"])
            if hp["nesterov"]:
                grads = torch._foreach_add(grads, bufs, alpha=momentum)
            else:
                grads = bufs
        torch._foreach_add_(params, grads, alpha=-hp["lr"])

    # --- CUDA and planning ---------------------------------------------------------------------

    def cuda_flags(self, hp: Hyperparameters) -> int:
        return (MAXIMIZE if hp.get("maximize") else 0) | (NESTEROV if hp.get("nesterov") else 0)

    def cuda_scalars(self, hp: Hyperparameters, step: float, *, numel: int, ndim: int, dtype: str) -> list[float]:
        lr, wd = float(hp.get("lr", 0.0)), float(hp.get("weight_decay", 0.0))
        return [-lr, hp.get("momentum", 0.0), 1 - float(hp.get("dampening", 0.0)), wd, 1.0 if step == 1 else 0.0]

    def state_bytes(self, shape: tuple[int, ...], name: str = "") -> int:
        return 4 * math.prod(shape)  # the planner assumes momentum (SGD without it keeps nothing)

    # --- state_dict ---------------------------------------------------------------------------

    def has_state(self, small: dict[str, Any]) -> bool:
        return bool(small.get("has_buffer")) and float(small["step"]) > 0

    def init_small_state(self, tensor: TensorInfo, hp: Hyperparameters) -> dict[str, Any]:
        return {"step": torch.zeros((), dtype=torch.float32), "has_buffer": hp.get("momentum", 0) != 0}

    def export_state(self, tensor, small, paged):
        return {name: flat.reshape(tensor.shape) for name, flat in paged.items()}

    def import_state(self, tensor, small, entry, fields):
        paged = {}
        for field in fields:
            if field.name not in entry or entry[field.name] is None:
                raise ValueError(f"state of tensor {tensor.index} has no {field.name!r}")
            value = entry[field.name]
            if value.numel() != tensor.numel:
                raise ValueError(f"state {field.name!r} of tensor {tensor.index} has {value.numel()} "
                                 f"elements, expected {tensor.numel}")
            paged[field.name] = value.reshape(-1).to(field.dtype)
        # A loaded buffer means the tensor is past its first step.
        small["step"].fill_(max(float(small["step"]), 1.0) if paged else 0.0)
        return paged


# The specs this module registers (stated_kernels.MODULES).
SPECS = (SGD(),)
