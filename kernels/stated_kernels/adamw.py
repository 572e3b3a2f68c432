r"""Adam and AdamW, following torch.optim.Adam / torch.optim.AdamW (ALGORITHMS.md section 1).

Per step, for every tensor with a gradient (t counted per tensor, from 1):

    g   <- -g                                  if maximize
    AdamW: theta <- theta * (1 - lr * lambda)   (decoupled decay, before the step)
    Adam:  g     <- g + lambda * theta          (L2: it enters both moments)
    m   <- beta1 * m + (1 - beta1) * g
    v   <- beta2 * v + (1 - beta2) * g^2
    vmax <- max(vmax, v)                        if amsgrad; vmax replaces v below
    theta <- theta - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

The CPU update runs torch's fused CPU kernel (`torch._fused_adamw_` / `torch._fused_adam_`) over all
segments of a page that share a group, one call per page and group: it reaches the machine's memory
bandwidth, where the single-tensor path is 6-9x slower (PERFORMANCE.md). Its results equal
`torch.optim.AdamW(fused=True)` exactly and the default single-tensor path within one ulp per step
(it writes m as a multiply-add where the single-tensor path uses lerp).

State: `exp_avg`, `exp_avg_sq` (and `max_exp_avg_sq` with amsgrad) in the parameter's dtype, paged;
`step` a float32 scalar per tensor, resident. The moments' storage is a format
(stated_kernels.formats): dense here; AdamW8bit keeps the same fields in 8-bit blockwise format.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from stated_kernels import formats
from stated_kernels.cuda_spec import AMSGRAD, DECOUPLED, MAXIMIZE, CudaSpec, Schedule, fields_slots
from stated_kernels.spec import (
    Algorithm,
    FieldSpec,
    HyperSpec,
    Hyperparameters,
    Segment,
    TensorInfo,
    changed,
    decay_scalar,
    non_negative,
    unit_interval,
    weight_decay,
)


def moments(amsgrad: bool) -> tuple[str, ...]:
    return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if amsgrad else ("exp_avg", "exp_avg_sq")


class AdamW(Algorithm):
    name = "adamw"
    independent_segments = True  # elementwise; per-tensor state is only read
    decoupled = True
    hyperparameters = (
        HyperSpec("lr", 1e-3, check=non_negative),
        HyperSpec("beta1", 0.9, check=unit_interval, key="betas", index=0),
        HyperSpec("beta2", 0.999, check=unit_interval, key="betas", index=1),
        HyperSpec("eps", 1e-8, check=non_negative),
        weight_decay(1e-2),
        HyperSpec("amsgrad", False, is_flag=True),
        HyperSpec("maximize", False, is_flag=True),
    )

    cuda = CudaSpec("adamw.cu", Schedule(("stated_adamw",)), fields_slots("exp_avg", "exp_avg_sq", "max_exp_avg_sq"))

    def moment_format(self, tensor: TensorInfo, name: str) -> formats.FieldFormat:
        """How moment `name` of this tensor is stored."""
        return formats.Dense(tensor.dtype)

    def page_fields(self, tensor: TensorInfo, hp: Hyperparameters) -> tuple[FieldSpec, ...]:
        names = moments(bool(hp.get("amsgrad", False)))
        return formats.page_fields({n: self.moment_format(tensor, n) for n in names})

    def update(self, segments: Sequence[Segment], hp: Hyperparameters, pass_index: int = 0) -> None:
        amsgrad = bool(hp["amsgrad"])
        kernel = torch._fused_adamw_ if self.decoupled else torch._fused_adam_
        kernel(
            [s.param for s in segments],
            [s.grad for s in segments],
            [s.fields["exp_avg"] for s in segments],
            [s.fields["exp_avg_sq"] for s in segments],
            [s.fields["max_exp_avg_sq"] for s in segments] if amsgrad else [],
            [s.small["step"] for s in segments],
            lr=float(hp["lr"]),
            beta1=float(hp["beta1"]),
            beta2=float(hp["beta2"]),
            weight_decay=float(hp["weight_decay"]),
            eps=float(hp["eps"]),
            amsgrad=amsgrad,
            maximize=bool(hp["maximize"]),
        )


    def formed_scalars(self, hp: Hyperparameters) -> list[tuple[str, float]]:
        # The step size lr / (1 - beta1^t) is largest at t = 1.
        step_size = ("lr / (1 - beta1)", float(hp["lr"]) / (1 - float(hp["beta1"])))
        return [decay_scalar(hp), step_size] if self.decoupled else [step_size]

    def cuda_flags(self, hp: Hyperparameters) -> int:
        return ((MAXIMIZE if hp.get("maximize") else 0) | (AMSGRAD if hp.get("amsgrad") else 0)
                | (DECOUPLED if self.decoupled else 0))

    def cuda_scalars(self, hp: Hyperparameters, step: float, *, numel: int, ndim: int, dtype: str) -> list[float]:
        lr, wd = float(hp.get("lr", 0.0)), float(hp.get("weight_decay", 0.0))
        b1, b2 = float(hp["beta1"]), float(hp["beta2"])
        return [1 - b1, b2, 1 - b2, hp["eps"], wd, 1 - lr * wd, -(lr / (1 - b1 ** step)), (1 - b2 ** step) ** 0.5]


class Adam(AdamW):
    """Adam: the same kernel with L2 weight decay (default 0) instead of decoupled decay."""

    name = "adam"
    decoupled = False
    planned = False  # its state is AdamW's
    hyperparameters = changed(AdamW.hyperparameters, weight_decay=0.0)


# The specs this module registers (stated_kernels.MODULES).
SPECS = (AdamW(), Adam())
