"""stated.AdamW, stated.Adam and stated.SGD: torch.optim's signatures and defaults, state in the daemon.

Each class differs from torch.optim's only by the keyword-only `address=`, `job=`, `rank=`,
`master_weights=`, `max_grad_norm=` and `resume=` (stated_client.optimizer), and by where its state lives. `foreach` and `fused` are accepted and ignored: the daemon always runs its own
fused kernel.
"""

from __future__ import annotations

from typing import Any

import torch

from stated_client.hyperparameters import SpecOptimizer


class AdamW(SpecOptimizer):
    """torch.optim.AdamW with its state in the stated daemon (decoupled weight decay)."""

    algorithm = "adamw"
    elementwise = True  # exact on FSDP2's shards (Note [sharded parameters] in stated_client.step_inputs)

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, address: str | None = None, job: str | None = None,
                 rank: int | None = None,
                 master_weights: bool = False, max_grad_norm: float | None = None, resume: bool = False):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused)
        self._extra_defaults(defaults)
        super().__init__(params, defaults, address=address, job=job, rank=rank,
                         master_weights=master_weights, max_grad_norm=max_grad_norm, resume=resume)

    def _extra_defaults(self, defaults: dict[str, Any]) -> None:
        # torch.optim.AdamW is Adam with decoupled decay; its state_dict records that.
        defaults["decoupled_weight_decay"] = True

    def _bad_tuple(self, key: str, size: int, value: Any) -> str:
        return f"betas must be a pair (beta1, beta2), got {value!r}"


class Adam(AdamW):
    """torch.optim.Adam with its state in the stated daemon (L2 weight decay, default 0)."""

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, amsgrad: bool = False, *, foreach: bool | None = None,
                 maximize: bool = False, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, decoupled_weight_decay: bool = False, address: str | None = None,
                 job: str | None = None, rank: int | None = None,
                 master_weights: bool = False, max_grad_norm: float | None = None, resume: bool = False):
        self._decoupled = bool(decoupled_weight_decay)
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize, foreach=foreach,
                         capturable=capturable, differentiable=differentiable, fused=fused, address=address,
                         job=job, rank=rank, master_weights=master_weights, max_grad_norm=max_grad_norm, resume=resume)

    @property
    def algorithm(self) -> str:  # Adam(decoupled_weight_decay=True) is AdamW, as in torch
        return "adamw" if self._decoupled else "adam"

    def _extra_defaults(self, defaults: dict[str, Any]) -> None:
        defaults["decoupled_weight_decay"] = self._decoupled


class SGD(SpecOptimizer):
    """torch.optim.SGD with its momentum buffers in the stated daemon."""

    algorithm = "sgd"
    elementwise = True  # exact on FSDP2's shards (Note [sharded parameters] in stated_client.step_inputs)

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float | torch.Tensor = 0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, differentiable: bool = False, fused: bool | None = None,
                 address: str | None = None, job: str | None = None, rank: int | None = None,
                 master_weights: bool = False, max_grad_norm: float | None = None, resume: bool = False):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        maximize=maximize, foreach=foreach, differentiable=differentiable, fused=fused)
        super().__init__(params, defaults, address=address, job=job, rank=rank,
                         master_weights=master_weights, max_grad_norm=max_grad_norm, resume=resume)

    def _state_entry(self, entry: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        entry.pop("step", None)  # torch's SGD keeps no step count
        return entry
