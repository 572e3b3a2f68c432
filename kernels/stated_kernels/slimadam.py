r"""SlimAdam, following low-memory-adam `SlimAdamW` at bb3652c (ALGORITHMS.md section 7; Kalra et al.,
arXiv 2503.01843): AdamW whose second moment is averaged over some dims K of a tensor.

Per step, for every tensor with a gradient, in the reference's order (t counted per tensor from 1):

    mu    <- beta1 * mu + (1 - beta1) * g                       (multiply-add, not lerp)
    nu    <- beta2 * nu + (1 - beta2) * mean_K(g^2)             (keepdim; K = None: g^2)
    theta <- theta * (1 - lr * lambda)                          if lambda > 0 and ndim >= 2
    theta <- theta - lr * (mu / (1 - beta1^t)) / (sqrt(nu / (1 - beta2^t)) + eps)

with the bias corrections in float64 and nu broadcast over K. lr, betas, eps and weight_decay are
required, as in the reference. Weight decay never applies to tensors with fewer than 2 dims.

Rules (K per tensor), first match wins:

1. an explicit rule in the tensor's registered name, `<name>|compress_dims=<dims>`, where <dims> is
   a comma-separated list of dims or `none`: the way a client passes a rules file over the wire;
2. the `rules` given to the constructor, by exact name (a `_orig_mod.` prefix is ignored);
3. the static rules: the first layer type in `LAYER_MAP` (in order) with a pattern inside the name.
Tensors with fewer than 2 dims are never compressed (the reference crashes on them). Dims are those
of the tensor (negative ones count from the end); a rule whose dim is out of range raises ValueError
at registration.

State: `mu` is elementwise and paged. A compressed `nu` (θ's shape with the dims of K set to 1) is
small and resident, updated in `prepass` from the whole gradient, which also forms its denominator
sqrt(nu / bc2) + eps once per step; an uncompressed `nu` is paged. state_dict keys are the
reference's: `mu`, `nu`, `step`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from stated_kernels.adafactor import expand_slice
from stated_kernels.cuda_small import SmallPlan, SmallSlot, checked
from stated_kernels.cuda_spec import CudaSpec, Schedule, fields_slots
from stated_kernels.spec import (
    Algorithm,
    FieldSpec,
    HyperSpec,
    Hyperparameters,
    Segment,
    TensorInfo,
    decay_scalar,
    non_negative,
    unit_interval,
    weight_decay,
)

Rule = tuple[int, ...] | None

# Layer type -> (name patterns, K), in the reference's order (layer_map.json and the paper's Table 1).
LAYER_MAP: dict[str, tuple[tuple[str, ...], Rule]] = {
    "attention_query": (("q_proj", "query", "q.weight"), (1,)),
    "attention_key": (("k_proj", "key", "k.weight"), (1,)),
    "attention_value": (("v_proj", "value", "v.weight"), (0,)),
    "attention_output": (("o_proj", "output_proj", "out_proj", "attn.c_proj"), (0,)),
    "mlp_up": (("mlp_up", "c_fc", "fc1", "up_proj", "w1"), (0,)),
    "mlp_gate": (("gate_proj", "mlp.gate", "w2"), (0,)),
    "mlp_down": (("mlp_proj", "mlp_down", "c_proj", "fc2", "down_proj", "w3"), (0,)),
    "token_embedding": (("wte", "embed", "embedding", "token_embedding"), (1,)),
    "position_embedding": (("wpe", "pos_embed", "position_embedding"), (1,)),
    "lm_head": (("lm_head", "output_layer", "classifier"), (1,)),
    "vision_first": (("conv1", "patch_embed", "first_conv"), (1,)),
    "norm": (("ln_", "norm", "layer_norm", "layernorm"), None),
}
RULE_MARK = "|compress_dims="
MAX_RUNS = 8  # ST_MAX_RUNS in slimadam.cu


def static_rule(name: str) -> Rule:
    for patterns, rule in LAYER_MAP.values():
        if any(p in name for p in patterns):
            return rule
    return None


def parse_rule(text: str) -> Rule:
    """`none` (or empty) or comma-separated dims, as a tensor name carries them after RULE_MARK."""
    text = text.strip()
    if text.lower() in ("", "none", "null"):
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"compress_dims must be 'none' or comma-separated integers, got {text!r}") from None


class SlimAdam(Algorithm):
    name = "slimadam"
    independent_segments = True  # elementwise; per-tensor state is only read
    hyperparameters = (
        HyperSpec("lr", None, check=non_negative),
        HyperSpec("beta1", None, check=unit_interval, key="betas", index=0),
        HyperSpec("beta2", None, check=unit_interval, key="betas", index=1),
        HyperSpec("eps", None, check=non_negative),
        weight_decay(None),
    )

    cuda = CudaSpec("slimadam.cu", Schedule(("stated_slimadam_page",), prepass=("stated_slimadam_reduce",)),
                    fields_slots("mu", "nu"), rounded_to_state=(1, 3, 4))

    def __init__(self, rules: Mapping[str, Sequence[int] | None] | None = None):
        self.rules = {k.removeprefix("_orig_mod."): (None if v is None else tuple(v)) for k, v in (rules or {}).items()}

    def rule(self, tensor: TensorInfo) -> Rule:
        """K for this tensor, normalized to sorted non-negative dims; None: not compressed."""
        ndim = len(tensor.shape)
        name, mark, explicit = tensor.name.partition(RULE_MARK)
        if ndim < 2:
            return None
        if mark:
            rule = parse_rule(explicit)
        else:
            key = name.removeprefix("_orig_mod.")
            rule = self.rules[key] if key in self.rules else static_rule(name)
        if rule is None:
            return None
        if any(not -ndim <= d < ndim for d in rule):
            raise ValueError(f"compress_dims {rule} of tensor {tensor.index} ({name!r}) are out of range for "
                             f"its {ndim} dims")
        return tuple(sorted({d % ndim for d in rule}))

    def _nu_shape(self, tensor: TensorInfo, rule: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(1 if d in rule else n for d, n in enumerate(tensor.shape))

    def page_fields(self, tensor: TensorInfo, hp: Hyperparameters) -> tuple[FieldSpec, ...]:
        mu = FieldSpec("mu", tensor.dtype)
        return (mu,) if self.rule(tensor) is not None else (mu, FieldSpec("nu", tensor.dtype))

    def init_small_state(self, tensor: TensorInfo, hp: Hyperparameters) -> dict[str, Any]:
        small = super().init_small_state(tensor, hp)
        rule = self.rule(tensor)
        if rule is not None:
            small["nu"] = torch.zeros(self._nu_shape(tensor, rule), dtype=tensor.dtype)
            small["_rule"] = rule
        return small

    # --- the step -----------------------------------------------------------------------------

    def formed_scalars(self, hp: Hyperparameters) -> list[tuple[str, float]]:
        return [decay_scalar(hp)]

    def prepass(self, tensor: TensorInfo, param: torch.Tensor, grad: torch.Tensor,
                small: dict[str, Any], hp: Hyperparameters) -> None:
        if "nu" not in small or tensor.numel == 0:
            return  # Note [empty tensors]: the mean over an empty dim would be nan
        beta2, t = float(hp["beta2"]), int(small["step"])
        grad = grad.to(tensor.dtype)  # 16-bit arenas with float32 master weights
        small["nu"].mul_(beta2).add_(torch.mean(grad * grad, dim=small["_rule"], keepdim=True), alpha=1 - beta2)
        small["_denom"] = (small["nu"] / (1 - beta2**t)).sqrt() + float(hp["eps"])

    def update(self, segments: Sequence[Segment], hp: Hyperparameters, pass_index: int = 0) -> None:
        lr, eps, decay = float(hp["lr"]), float(hp["eps"]), float(hp["weight_decay"])
        beta1, beta2 = float(hp["beta1"]), float(hp["beta2"])
        for s in segments:
            t = int(s.small["step"])
            g, mu = s.grad, s.fields["mu"]
            mu.mul_(beta1).add_(g, alpha=1 - beta1)
            if "nu" in s.fields:
                nu = s.fields["nu"]
                nu.mul_(beta2).add_(g**2, alpha=1 - beta2)
                denom = (nu / (1 - beta2**t)).sqrt() + eps
            else:
                denom = expand_slice(s.small["_denom"], s.tensor.shape, s.start, s.length)
            if decay > 0 and len(s.tensor.shape) >= 2:
                s.param.mul_(1 - lr * decay)
            s.param.add_(-(lr * ((mu / (1 - beta1**t)) / denom)))

    # --- CUDA and planning ---------------------------------------------------------------------

    def cuda_scalars(self, hp: Hyperparameters, step: float, *, numel: int, ndim: int, dtype: str) -> list[float]:
        lr = float(hp.get("lr", 0.0))
        wd = float(hp.get("weight_decay", 0.0)) if ndim >= 2 else 0.0  # 1-D tensors are never decayed
        b1, b2, t = float(hp["beta1"]), float(hp["beta2"]), int(step)
        return [b1, 1 - b1, b2, 1 - b2, hp["eps"], lr, 1 - lr * wd, wd, 1 - b1 ** t, 1 - b2 ** t]

    def cuda_small(self, tensor: TensorInfo, kernel_state: torch.dtype, small: dict[str, Any]) -> SmallPlan:
        if "nu" not in small:
            return SmallPlan()
        return checked(self.name, slim_plan(tuple(tensor.shape), tuple(small["_rule"]), kernel_state), tensor, small)

    def state_bytes(self, shape: tuple[int, ...], name: str = "") -> int:
        """mu, and nu averaged over the tensor's rule (by its name, as the daemon decides it)."""
        rule = self.rule(TensorInfo(0, tuple(shape), torch.float32, 0, name))
        n = math.prod(shape)
        kept = n // math.prod(shape[d] for d in rule) if rule and n else n
        return 4 * n + 4 * kept

    # --- state_dict ---------------------------------------------------------------------------

    def export_state(self, tensor: TensorInfo, small: dict[str, Any],
                     paged: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        entry = {"step": small["step"].clone()}
        entry.update({name: flat.reshape(tensor.shape) for name, flat in paged.items()})
        if "nu" in small:
            entry["nu"] = small["nu"].clone()
        return entry

    def import_state(self, tensor: TensorInfo, small: dict[str, Any], entry: dict[str, torch.Tensor],
                     fields: Sequence[FieldSpec]) -> dict[str, torch.Tensor]:
        if "nu" in small:
            value = entry.get("nu")
            if value is None:
                raise ValueError(f"state of tensor {tensor.index} has no 'nu'")
            if tuple(value.shape) != tuple(small["nu"].shape):
                raise ValueError(f"state 'nu' of tensor {tensor.index} has shape {tuple(value.shape)}, expected "
                                 f"{tuple(small['nu'].shape)} (compress_dims {small['_rule']})")
            small["nu"].copy_(value)
        return super().import_state(tensor, small, entry, fields)


# --- the CUDA kernels' view of the compressed second moment ---------------------------------------


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


# The specs this module registers (stated_kernels.MODULES).
SPECS = (SlimAdam(),)
