"""The memory-lean optimizers: stated.AdamW8bit, Adafactor, CAME, Lion and SlimAdam.

Each takes its reference's signature and defaults (ALGORITHMS.md's first table names the reference),
plus the keyword-only `address=`, `job=`, `rank=`, `master_weights=`, `max_grad_norm=` and `resume=` of every
stated optimizer. The math runs in the
daemon (stated_kernels); state_dict uses the reference's key names.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from stated_client.errors import InvalidArgumentError
from stated_client.hyperparameters import SpecOptimizer, as_float


class AdamW8bit(SpecOptimizer):
    """AdamW with blockwise 8-bit moments (torchao's AdamW8bit math on the bitsandbytes map).

    State is 2 bytes per parameter plus one float per 256-element block for tensors of 4096 elements or
    more whose size is a multiple of 256; smaller tensors keep fp32 state, as torchao does. The pages
    hold the 8-bit codes themselves, so paging moves four times fewer bytes than AdamW.
    """

    algorithm = "adamw8bit"

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 amsgrad: bool = False, *, block_size: int = 256, bf16_stochastic_round: bool = False,
                 address: str | None = None, job: str | None = None, rank: int | None = None,
                 master_weights: bool = False, max_grad_norm: float | None = None, resume: bool = False):
        if block_size != 256:
            raise InvalidArgumentError(f"block_size must be 256 (the bitsandbytes block), got {block_size}")
        if bf16_stochastic_round:
            raise InvalidArgumentError("bf16_stochastic_round=True is not supported by stated")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        block_size=block_size, bf16_stochastic_round=bf16_stochastic_round)
        super().__init__(params, defaults, address=address, job=job, rank=rank,
                         master_weights=master_weights, max_grad_norm=max_grad_norm, resume=resume)


class Adafactor(SpecOptimizer):
    """torch.optim.Adafactor: factored second moment, no first moment."""

    algorithm = "adafactor"

    def __init__(self, params, lr: float | torch.Tensor = 1e-2, beta2_decay: float = -0.8,
                 eps: tuple[float | None, float] = (None, 1e-3), d: float = 1.0, weight_decay: float = 0.0, *,
                 foreach: bool | None = None, maximize: bool = False, address: str | None = None,
                 job: str | None = None, rank: int | None = None,
                 master_weights: bool = False, max_grad_norm: float | None = None, resume: bool = False):
        defaults = dict(lr=lr, beta2_decay=beta2_decay, eps=eps, d=d, weight_decay=weight_decay, foreach=foreach,
                        maximize=maximize)
        super().__init__(params, defaults, address=address, job=job, rank=rank,
                         master_weights=master_weights, max_grad_norm=max_grad_norm, resume=resume)


class CAME(SpecOptimizer):
    """CAME (came-pytorch): confidence-guided factored Adam. `lr` is required, as in the reference."""

    algorithm = "came"

    def __init__(self, params, lr: float | None = None, eps=(1e-30, 1e-16), clip_threshold: float = 1.0,
                 betas=(0.9, 0.999, 0.9999), weight_decay: float = 0.0, *, address: str | None = None,
                 job: str | None = None, rank: int | None = None,
                 master_weights: bool = False, max_grad_norm: float | None = None, resume: bool = False):
        if lr is None:
            raise InvalidArgumentError("lr is required for CAME (came-pytorch has no default learning rate)")
        defaults = dict(lr=lr, eps=eps, clip_threshold=clip_threshold, betas=betas, weight_decay=weight_decay)
        super().__init__(params, defaults, address=address, job=job, rank=rank,
                         master_weights=master_weights, max_grad_norm=max_grad_norm, resume=resume)


class Lion(SpecOptimizer):
    """Lion (lion-pytorch): sign of an interpolated momentum; 4 bytes of state per parameter."""

    algorithm = "lion"
    elementwise = True  # exact on FSDP2's shards (Note [sharded parameters] in stated_client.step_inputs)

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0,
                 use_triton: bool = False, decoupled_weight_decay: bool = False, *, address: str | None = None,
                 job: str | None = None, rank: int | None = None,
                 master_weights: bool = False, max_grad_norm: float | None = None, resume: bool = False):
        # lion-pytorch divides decoupled decay by the lr the optimizer was built with.
        self._init_lr = as_float(lr)
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay)
        self._decoupled = bool(decoupled_weight_decay)
        super().__init__(params, defaults, address=address, job=job, rank=rank,
                         master_weights=master_weights, max_grad_norm=max_grad_norm, resume=resume)

    def _fixed_hyperparameters(self) -> dict[str, Any]:
        return {"init_lr": self._init_lr, "decoupled_weight_decay": self._decoupled}

    def _state_entry(self, entry: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        entry.pop("step", None)  # lion-pytorch keeps no step count
        return entry


class SlimAdam(SpecOptimizer):
    """SlimAdamW (low-memory-adam): AdamW whose second moment is averaged over some dims of a tensor.

    Pass `model.named_parameters()` so the static rules can match layer names (q/k/v/o projections, MLP,
    embeddings, lm_head); `rules` (name -> dims or None) or `rules_json_path` override them by exact
    name. 1-D tensors are never compressed. lr, betas, eps and weight_decay are required, as in the
    reference.
    """

    algorithm = "slimadam"

    def __init__(self, named_parameters, *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                 rules: Mapping[str, Sequence[int] | None] | None = None, rules_json_path: str | None = None,
                 address: str | None = None, job: str | None = None, rank: int | None = None,
                 master_weights: bool = False, max_grad_norm: float | None = None, resume: bool = False):
        self._rules = dict(rules or {})
        if rules_json_path:
            with open(rules_json_path) as f:
                self._rules.update(json.load(f))
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(named_parameters, defaults, address=address, job=job, rank=rank,
                         master_weights=master_weights, max_grad_norm=max_grad_norm, resume=resume)

    def _tensor_name(self, name: str) -> str:
        key = name[len("_orig_mod."):] if name.startswith("_orig_mod.") else name
        if not self._rules:
            return name  # the static rules decide, in the daemon
        # With rules given, as in the reference, a name they do not list is not compressed.
        dims = self._rules.get(key)
        return f"{name}|compress_dims={'none' if dims is None else ','.join(str(int(d)) for d in dims)}"

