r"""The bitsandbytes "dynamic" 8-bit quantization maps and torchao's blockwise quantizer
(ALGORITHMS.md 3.1 and 3.3).

A map is 256 float32 values in ascending order. For i = 0 ... 6 it holds the midpoints of
n_i = 2^i + 1 (signed) or 2^(i+1) + 1 (unsigned) points spread evenly over [0.1, 1], scaled by 10^(i-6)
(and negated too for a signed map), plus 0 and 1. Every value is the float32 result of the float32
recipe, with torch.linspace's two one-rounding forms for the points:

    step = fl32(fl32(1 - fl32(0.1)) / (n - 1))
    b_j  = fl32(fl32(0.1) + step * j)            j <  n // 2
    b_j  = fl32(1 - step * (n - 1 - j))          j >= n // 2
    mu_j = fl32((b_j + b_{j+1}) / 2)
    value = fl32(fl32(10^(i-6)) * mu_j)

Note [exact float64]: every expression above is computed exactly in float64 and then rounded once to
float32, which is what one float32 operation (or fused multiply-add) gives. The products and sums
need at most 48 significant bits (a 24-bit float32 times a 7-bit integer, or two float32 values
within 2^30 of each other), and a float64 division rounded again to float32 is correctly rounded
(53 >= 2 * 24 + 2). So the maps do not depend on how this machine's torch.linspace rounds.

Quantization (torchao, `quantize_8bit_with_qmap`): a block of 256 consecutive values s is scaled by
A = max(max|s|, 1e-12) to x = s / A; the code is the largest i with q[i] <= x (0 if there is none),
moved up one if x - q[i] >= (q[i+1] - q[i]) / 2, so ties round up. There is no sign fix. Decoding
is q[code] * A.
"""

from __future__ import annotations

import functools

import torch

BLOCK = 256
ABSMAX_FLOOR = 1e-12


def _fl32(value: float) -> float:
    return float(torch.tensor(value, dtype=torch.float64).to(torch.float32))


@functools.cache
def _dynamic_map(signed: bool) -> tuple[float, ...]:
    start = _fl32(0.1)
    values = [0.0, 1.0]
    for i in range(7):
        n = 2**i + 1 if signed else 2 ** (i + 1) + 1
        step = _fl32(_fl32(1.0 - start) / (n - 1))
        points = [_fl32(start + step * j) if j < n // 2 else _fl32(1.0 - step * (n - 1 - j)) for j in range(n)]
        scale = _fl32(10.0 ** (i - 6))
        for lo, hi in zip(points, points[1:]):
            value = _fl32(scale * _fl32((lo + hi) / 2))
            values += [value, -value] if signed else [value]
    assert len(values) == 256
    return tuple(sorted(values))


def dynamic_map(signed: bool) -> torch.Tensor:
    """The signed (first moment) or unsigned (second moment) map: float32[256], ascending."""
    return torch.tensor(_dynamic_map(signed), dtype=torch.float32)


def quantize(values: torch.Tensor, qmap: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor) -> None:
    """Quantizes float32 `values` (length a multiple of BLOCK) into `codes` (uint8, same length) and
    `absmax` (float32, one per block), in place."""
    blocks = values.view(-1, BLOCK)
    scale = blocks.abs().amax(dim=1).clamp(min=ABSMAX_FLOOR)
    x = blocks / scale.view(-1, 1)
    low = torch.bucketize(x, qmap, right=True).sub_(1).clamp_(0, 255)
    high = (low + 1).clamp_(max=255)
    q_low = qmap[low]
    up = (x - q_low) >= (qmap[high] - q_low) * 0.5
    codes.view(-1, BLOCK).copy_(torch.where(up, high, low))
    absmax.copy_(scale)


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    """float32 values q[code] * A of `codes` (uint8) with one `absmax` per BLOCK codes."""
    return (qmap[codes.long()].view(-1, BLOCK) * absmax.view(-1, 1)).view(-1)
