r"""Lion, following lion-pytorch 0.2.5 `Lion` (ALGORITHMS.md section 6; Chen et al. 2023).

Per step, for every tensor with a gradient (no step counter, no bias correction, no eps):

    lambda' = lambda / init_lr        if decoupled_weight_decay, else lambda
    theta <- theta * (1 - lr * lambda')
    c     <- beta1 * m + (1 - beta1) * g
    theta <- theta - lr * sign(c)                 (sign(0) = 0)
    m     <- beta2 * m + (1 - beta2) * g          (after c is used)

The CPU update runs the reference's operations in its order (multiply, add with alpha, sgn) on each
segment; they are elementwise, so any segmentation gives the reference's bits.

`init_lr` stands for lion-pytorch's `_init_lr`, the lr the optimizer was constructed with, which only
decoupled weight decay reads. The client sends it as a hyperparameter; its default is the reference's
default lr.

State: `exp_avg` in the parameter's dtype, paged (4 B/param for fp32). The state_dict entry holds
only `exp_avg`, as the reference's does; the resident step count only records that it exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from stated_kernels.cuda_spec import CudaSpec, Schedule, fields_slots
from stated_kernels.spec import (
    Algorithm,
    FieldSpec,
    HyperSpec,
    Hyperparameters,
    Segment,
    TensorInfo,
    decay_scalar,
    positive,
    weight_decay,
)


def closed_unit_interval(value: float) -> str | None:
    """lion-pytorch and came-pytorch accept betas in [0, 1], 1 included."""
    return None if 0 <= value <= 1 else f"must be in [0, 1], got {value}"


class Lion(Algorithm):
    name = "lion"
    independent_segments = True  # elementwise; per-tensor state is only read
    hyperparameters = (
        HyperSpec("lr", 1e-4, check=positive),
        HyperSpec("beta1", 0.9, check=closed_unit_interval, key="betas", index=0),
        HyperSpec("beta2", 0.99, check=closed_unit_interval, key="betas", index=1),
        weight_decay(0.0),
        # lion-pytorch divides decoupled decay by the lr the optimizer was built with: the client
        # optimizer sends both, its param groups hold neither.
        HyperSpec("decoupled_weight_decay", False, is_flag=True, in_group=False),
        HyperSpec("init_lr", 1e-4, check=positive, in_group=False),
    )
    cuda = CudaSpec("lion.cu", Schedule(("stated_lion",)), fields_slots("exp_avg"), rounded_to_state=(0, 2, 3, 4, 5))

    def page_fields(self, tensor: TensorInfo, hp: Hyperparameters) -> tuple[FieldSpec, ...]:
        return (FieldSpec("exp_avg", tensor.dtype),)

    def formed_scalars(self, hp: Hyperparameters) -> list[tuple[str, float]]:
        if hp["decoupled_weight_decay"]:
            return [("lr * weight_decay / init_lr", float(hp["lr"]) * float(hp["weight_decay"]) / float(hp["init_lr"]))]
        return [decay_scalar(hp)]

    def update(self, segments: Sequence[Segment], hp: Hyperparameters, pass_index: int = 0) -> None:
        lr, beta1, beta2 = float(hp["lr"]), float(hp["beta1"]), float(hp["beta2"])
        decay = float(hp["weight_decay"])
        if hp["decoupled_weight_decay"]:
            decay /= float(hp["init_lr"])
        params = [s.param for s in segments]
        grads = [s.grad for s in segments]
        moments = [s.fields["exp_avg"] for s in segments]
        if decay != 0:  # a multiply by 1.0 changes no bits, so it is skipped
            torch._foreach_mul_(params, 1.0 - lr * decay)
        signs = torch._foreach_mul(moments, beta1)
        torch._foreach_add_(signs, grads, alpha=1.0 - beta1)
        torch._foreach_sign_(signs)
        torch._foreach_add_(params, signs, alpha=-lr)
        torch._foreach_mul_(moments, beta2)
        torch._foreach_add_(moments, grads, alpha=1.0 - beta2)

    def cuda_scalars(self, hp: Hyperparameters, step: float, *, numel: int, ndim: int, dtype: str) -> list[float]:
        lr, wd = float(hp.get("lr", 0.0)), float(hp.get("weight_decay", 0.0))
        decay = wd / float(hp["init_lr"]) if hp.get("decoupled_weight_decay") else wd
        b1, b2 = float(hp["beta1"]), float(hp["beta2"])
        return [1.0 - lr * decay, b1, 1 - b1, b2, 1 - b2, -lr]

    # --- state_dict ---------------------------------------------------------------------------

    def export_state(self, tensor: TensorInfo, small: dict[str, Any],
                     paged: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"exp_avg": paged["exp_avg"].reshape(tensor.shape)}

    def import_state(self, tensor: TensorInfo, small: dict[str, Any], entry: dict[str, torch.Tensor],
                     fields: Sequence[FieldSpec]) -> dict[str, torch.Tensor]:
        value = entry.get("exp_avg")
        if value is None:
            raise ValueError(f"state of tensor {tensor.index} has no 'exp_avg'")
        if value.numel() != tensor.numel:
            raise ValueError(f"state 'exp_avg' of tensor {tensor.index} has {value.numel()} elements, "
                             f"expected {tensor.numel}")
        # The reference keeps no step; a loaded moment means the tensor has stepped.
        small["step"].fill_(max(float(entry.get("step", 0.0)), 1.0))
        return {"exp_avg": value.reshape(-1).to(fields[0].dtype)}


# The specs this module registers (stated_kernels.MODULES).
SPECS = (Lion(),)
