r"""AdamW with 8-bit blockwise state, following torchao 0.18.0 `AdamW8bit` (ALGORITHMS.md 3.1, 3.3).

Per step, for every tensor with a gradient, all in float32 (lr is held as a float32 scalar tensor and
the step count is a float32 tensor, as in torchao):

    theta <- theta - (lr * lambda) * theta                     (decoupled decay, before the step)
    bc1 = 1 - beta1^t,  bc2 = 1 - beta2^t                      (float32)
    m     <- lerp(deq(m), g, 1 - beta1)
    v     <- lerp(deq(v), g^2, 1 - beta2)                      (both stored quantized)
    vmax  <- max(deq(vmax), v)                                 if amsgrad; vmax replaces v below
    theta <- theta - lr * (m / bc1) / (sqrt(v) / sqrt(bc2) + eps)   (with the unquantized m and v)

Quantization (`stated_kernels.quant_maps`): blocks of 256 consecutive elements of the flattened
tensor, one float32 absmax per block (floored at 1e-12), the bitsandbytes "dynamic" maps (signed for
m, unsigned for v and vmax), nearest code with ties up. Segments start on block boundaries, so the
numbers do not depend on the paging.

Note [compiled torchao]: torchao runs its step through torch.compile, and the CPU update here gives
that compiled kernel's bits (codes, scales and theta), not those of torchao's code run eagerly. Two
eager operations round differently from the compiled kernel: torch.lerp fuses its multiply-add where
inductor decomposes it into separately rounded operations (it builds with -ffp-contract=off), and
eager torch.sqrt may use MKL's vector sqrt, one ulp off for about a fifth of the inputs, where the
compiled kernel takes the IEEE root. `_lerp` and `_sqrt` follow the compiled kernel; everything else
is torchao's operations in torchao's order.

State: as torchao, a tensor gets 8-bit state only if numel >= 4096 and numel % 256 == 0; otherwise
`exp_avg`, `exp_avg_sq` are kept in the parameter's dtype (float32 for float32 parameters). 8-bit
tensors page their codes and scales, which is also their state_dict format:

    exp_avg, exp_avg_sq, max_exp_avg_sq               uint8 codes, the parameter's shape
    exp_avg_scale, exp_avg_sq_scale, max_exp_avg_sq_scale   float32 absmax, numel / 256

that is 2 + 8/256 = 2.03 B/param (3.05 with amsgrad); `step` is a float32 scalar. (torchao 0.18.0's
own amsgrad fails to compile for 8-bit state with torch 2.13 on CPU, so amsgrad here follows
ALGORITHMS.md 3.3 step 4 untested against it.) These are torchao's
`codes` and `scale` of its `OptimState8bit` states. `to_torchao` builds those objects (to load into
torchao's AdamW8bit) and `dequantize_state` / `quantize_state` convert to and from the float32
`exp_avg`, `exp_avg_sq` that torch.optim.AdamW loads. `import_state` also takes float32 moments and
quantizes them.

The moments' storage is a format (stated_kernels.formats): `Blockwise8bit` for tensors that get 8-bit
state, `Dense` otherwise; AdamW8bit is AdamW's fields and hyperparameters (its table, with its checks)
in that format, with torchao's order of operations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from stated_kernels import formats, quant_maps
from stated_kernels.adamw import AdamW
from stated_kernels.cuda_small import SmallPlan
from stated_kernels.cuda_spec import AMSGRAD, MASTER_SLOT, CudaSpec, Schedule
from stated_kernels.spec import FieldSpec, Hyperparameters, Segment, TensorInfo, changed

MIN_8BIT_SIZE = 4096
BLOCK = quant_maps.BLOCK
# Moment name -> its 8-bit format (the signed map for m, the unsigned one for v and vmax).
EIGHT_BIT = {"exp_avg": formats.Blockwise8bit(True), "exp_avg_sq": formats.Blockwise8bit(False),
             "max_exp_avg_sq": formats.Blockwise8bit(False)}


def is_quantized(numel: int) -> bool:
    """torchao's rule: small tensors, and tensors that do not split into whole blocks, stay float."""
    return numel >= MIN_8BIT_SIZE and numel % BLOCK == 0


def _lerp(start: torch.Tensor, end: torch.Tensor, weight: float) -> torch.Tensor:
    """torch.lerp as compiled torchao computes it (Note [compiled torchao]): coeff * (end - start) +
    base, with the weight in float32 and every operation rounded on its own."""
    coeff = torch.tensor(weight, dtype=torch.float32)
    if abs(weight) >= 0.5:
        return (end - start).mul_(coeff - 1).add_(end)
    return (end - start).mul_(coeff).add_(start)


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root of a contiguous tensor (Note [compiled torchao]):
    numpy's float32 sqrt is the IEEE instruction."""
    return torch.as_tensor(np.sqrt(x.numpy()))


def _corrections(beta1: float, beta2: float, step: float) -> tuple[float, float]:
    """bc1 and sqrt(bc2) exactly as the CPU update computes them: `1 - beta ** step` with step a
    float32 tensor, and the IEEE float32 square root."""
    t = torch.tensor(float(step), dtype=torch.float32)
    bc2 = np.float32((1 - beta2**t).item())
    return (1 - beta1**t).item(), float(np.sqrt(bc2))


_EIGHT_BIT_SLOTS = tuple((n, ("uint8", "S")) for n in EIGHT_BIT) + tuple((n + "_scale", ("float32",)) for n in EIGHT_BIT)


class AdamW8bit(AdamW):
    name = "adamw8bit"
    block_elements = BLOCK
    hyperparameters = changed(AdamW.hyperparameters, drop=("maximize",))  # torchao has no maximize
    cuda = CudaSpec("adamw8bit.cu", Schedule(("stated_adamw8bit",)), _EIGHT_BIT_SLOTS + (MASTER_SLOT,),
                    quant_maps=True)

    def moment_format(self, tensor: TensorInfo, name: str) -> formats.FieldFormat:
        return EIGHT_BIT[name] if is_quantized(tensor.numel) else formats.Dense(tensor.dtype)

    def update(self, segments: Sequence[Segment], hp: Hyperparameters, pass_index: int = 0) -> None:
        lr = torch.tensor(hp["lr"], dtype=torch.float32)
        lr_decay = lr * float(hp["weight_decay"])  # torchao's float32 (lr * weight_decay)
        beta1, beta2, eps = float(hp["beta1"]), float(hp["beta2"]), float(hp["eps"])
        amsgrad = bool(hp["amsgrad"])
        for s in segments:
            m_format = self.moment_format(s.tensor, "exp_avg")
            v_format = self.moment_format(s.tensor, "exp_avg_sq")  # also max_exp_avg_sq's
            step = s.small["step"]
            bias_correction1 = 1 - beta1**step
            bias_correction2 = 1 - beta2**step
            # torchao's operations and their grouping, so that the bits are too; a float32
            # parameter is updated in place, a 16-bit one through a float32 copy rounded once.
            p = s.param if s.param.dtype == torch.float32 else s.param.float()
            g = s.grad.float()
            p.sub_(p * lr_decay)
            m = _lerp(m_format.load(s.fields, "exp_avg"), g, 1 - beta1)
            v = _lerp(v_format.load(s.fields, "exp_avg_sq"), g.square(), 1 - beta2)
            m_format.store(s.fields, "exp_avg", m)
            v_format.store(s.fields, "exp_avg_sq", v)
            if amsgrad:
                v = torch.maximum(v_format.load(s.fields, "max_exp_avg_sq"), v)
                v_format.store(s.fields, "max_exp_avg_sq", v)
            denom = _sqrt(v).div_(_sqrt(bias_correction2)).add_(eps)
            p.sub_((m / bias_correction1).mul_(lr).div_(denom))
            if p is not s.param:
                s.param.copy_(p)

    # --- CUDA -------------------------------------------------------------------------------------

    def cuda_flags(self, hp: Hyperparameters) -> int:
        return AMSGRAD if hp.get("amsgrad") else 0

    def cuda_scalars(self, hp: Hyperparameters, step: float, *, numel: int, ndim: int, dtype: str) -> list[float]:
        lr, wd = float(hp.get("lr", 0.0)), float(hp.get("weight_decay", 0.0))
        b1, b2 = float(hp["beta1"]), float(hp["beta2"])
        bc1, bc2_sqrt = _corrections(b1, b2, step)
        # torchao: lr is a float32 tensor, so lr * weight_decay is one float32 multiply.
        return [lr, np.float32(lr) * np.float32(wd), 1 - b1, 1 - b2, hp["eps"], bc1, bc2_sqrt,
                1.0 if abs(1 - b1) >= 0.5 else 0.0, 1.0 if abs(1 - b2) >= 0.5 else 0.0]

    def cuda_small(self, tensor: TensorInfo, kernel_state: torch.dtype, small: dict[str, Any]) -> SmallPlan:
        return SmallPlan(kind=1 if is_quantized(tensor.numel) else 0)

    # --- planning and state_dict ------------------------------------------------------------------

    def state_bytes(self, shape: tuple[int, ...], name: str = "") -> int:
        """The planner counts bitsandbytes' rule (8-bit from min_8bit_size on, a partial last block
        with its own absmax), an upper bound on torchao's for tensors that are not whole blocks."""
        n = math.prod(shape)
        fmt = EIGHT_BIT["exp_avg"] if n >= MIN_8BIT_SIZE else formats.Dense(torch.float32)
        return 2 * fmt.nbytes(n)

    def import_state(self, tensor: TensorInfo, small: dict[str, Any], entry: dict[str, torch.Tensor],
                     fields: Sequence[FieldSpec]) -> dict[str, torch.Tensor]:
        if is_quantized(tensor.numel):
            entry = quantize_state(entry)
        else:
            for name in EIGHT_BIT:
                if name in entry and entry[name].dtype == torch.uint8:
                    raise ValueError(f"state {name!r} of tensor {tensor.index} holds 8-bit codes, but a tensor "
                                     f"of {tensor.numel} elements keeps float state")
        return super().import_state(tensor, small, entry, fields)


# --- conversions -------------------------------------------------------------------------------


def _codes(entry: dict[str, Any], name: str) -> bool:
    value = entry.get(name)
    return value is not None and getattr(value, "dtype", None) == torch.uint8


def dequantize_state(entry: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An AdamW8bit state_dict entry with float32 `exp_avg`, `exp_avg_sq` (and `max_exp_avg_sq`) in
    place of codes and scales, as torch.optim.AdamW loads it. Float entries pass through unchanged."""
    out = {k: v for k, v in entry.items() if not k.endswith("_scale")}
    for name, fmt in EIGHT_BIT.items():
        if _codes(entry, name):
            out[name] = fmt.decode(entry, name)
    return out


def quantize_state(entry: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Float moments of a tensor that gets 8-bit state become codes and scales, quantized as torchao
    quantizes a float copy into its 8-bit state; other entries pass through. Not an exact inverse of
    `dequantize_state`: the signed map has no -1, so a block whose largest magnitude is negative
    decodes to 0.993 of its scale and re-encodes with that smaller scale."""
    out = dict(entry)
    for name, fmt in EIGHT_BIT.items():
        value = entry.get(name)
        if value is None or value.dtype == torch.uint8 or not is_quantized(value.numel()):
            continue
        out[name], out[name + "_scale"] = fmt.encode(value)
    return out


def to_torchao(entry: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The entry as torchao's AdamW8bit keeps it: 8-bit moments become `OptimState8bit` objects
    (`dtype` is the parameter's). Needs torchao; float entries pass through."""
    from torchao.optim.subclass_8bit import OptimState8bit

    out = {k: v for k, v in entry.items() if not k.endswith("_scale")}
    for name, fmt in EIGHT_BIT.items():
        if _codes(entry, name):
            out[name] = OptimState8bit(entry[name].clone(), entry[name + "_scale"].clone(), fmt.qmap(), fmt.signed,
                                       dtype=dtype)
    return out


def from_torchao(entry: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The inverse of `to_torchao`: a torchao AdamW8bit state entry as stated's codes and scales."""
    out = {}
    for name, value in entry.items():
        if hasattr(value, "codes") and hasattr(value, "scale"):
            out[name], out[name + "_scale"] = value.codes.clone(), value.scale.clone()
        else:
            out[name] = value
    return out


# The specs this module registers (stated_kernels.MODULES).
SPECS = (AdamW8bit(),)
