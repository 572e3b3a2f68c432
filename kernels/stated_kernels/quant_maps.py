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
moved up one if fl32(x - q[i]) >= fl32(fl32(q[i+1] - q[i]) * 0.5), so ties round up. There is no sign
fix, and NaN gets code 0. Decoding is q[code] * A.

Note [code thresholds]: as x grows the code only steps up, so the code of x is the number of
thresholds t_0 <= ... <= t_254 at or below x, where t_i is the smallest float32 x >= q[i] that rounds
up from q[i] (found once per map by bisection over float32 bit patterns, using torchao's own float32
test). Instead of a binary search per element, `quantize` cuts the float32 line into bins by the top
bits of a monotonic integer key of x: a table gives, per bin, how many thresholds lie below it, and
the bins are narrow enough that at most two thresholds lie inside one, which two comparisons settle.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

BLOCK = 256
ABSMAX_FLOOR = 1e-12


def _fl32(value: float) -> float:
    return float(np.float32(value))


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


def _keys(x: torch.Tensor) -> torch.Tensor:
    """int32 keys in the order of the float32 values (-0.0 just below +0.0, NaN outside +-inf)."""
    bits = x.view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _floats(keys: torch.Tensor) -> torch.Tensor:
    return _keys(keys.to(torch.int32).view(torch.float32)).view(torch.float32)  # the map is an involution


@functools.cache
def _thresholds(signed: bool) -> torch.Tensor:
    """t_0..t_254 of Note [code thresholds], then two NaN (comparisons with NaN are false)."""
    q = dynamic_map(signed)
    low, high = q[:-1], q[1:]
    half_gap = (high - low) * 0.5
    lo, hi = _keys(low.clone()).long(), _keys(high.clone()).long()  # the answer lies in (lo, hi]
    while bool((hi - lo > 1).any()):
        mid = (lo + hi) // 2
        rounds_up = (_floats(mid) - low) >= half_gap
        hi = torch.where(rounds_up, mid, hi)
        lo = torch.where(rounds_up, lo, mid)
    return torch.cat([_floats(hi), torch.full((2,), float("nan"))])


@functools.cache
def _bins(signed: bool) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(shift, base, first, second) for bin = (key >> shift) + 2^(31 - shift): per bin, the number of
    thresholds below it and the (at most) two inside it, NaN where there are fewer. The shift is the
    widest that leaves at most two thresholds in a bin."""
    t = _thresholds(signed)
    keys = _keys(t[:-2].clone()).long()
    for shift in range(20, 0, -1):
        if int(torch.unique(keys >> shift, return_counts=True)[1].max()) <= 2:
            break
    starts = (torch.arange(1 << (32 - shift), dtype=torch.long) - (1 << (31 - shift))) << shift
    base = torch.searchsorted(keys, starts, right=False)  # thresholds strictly below each bin
    inside = torch.searchsorted(keys, starts + ((1 << shift) - 1), right=True) - base
    first = torch.where(inside >= 1, t[base.clamp(max=254)], float("nan"))
    second = torch.where(inside >= 2, t[(base + 1).clamp(max=254)], float("nan"))
    # Keys above +inf's are NaN: code 0 like torchao (their bins hold nothing else, since +inf's key
    # is a multiple of 2^shift).
    base[starts >= int(_keys(torch.tensor([float("inf")]))[0])] = 0
    return shift, base.to(torch.uint8), first, second


def codes_of(x: torch.Tensor, signed: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """torchao's code (uint8) of every float32 in `x` (contiguous) in the signed or unsigned map."""
    shift, base, first, second = _bins(signed)
    x = x.reshape(-1)
    bins = x.view(torch.int32) >> 31  # the key of Note [code thresholds], in place
    bins.bitwise_and_(0x7FFFFFFF).bitwise_xor_(x.view(torch.int32))
    bins.bitwise_right_shift_(shift).add_(1 << (31 - shift))
    codes = torch.index_select(base, 0, bins, out=out.view(-1) if out is not None else None)
    codes.add_(x >= first.index_select(0, bins))
    return codes.add_(x >= second.index_select(0, bins))


def quantize(values: torch.Tensor, signed: bool, codes: torch.Tensor, absmax: torch.Tensor) -> None:
    """Quantizes float32 `values` (length a multiple of BLOCK) into `codes` (uint8, same length) and
    `absmax` (float32, one per block), in place."""
    blocks = values.view(-1, BLOCK)
    work = blocks.abs()
    torch.amax(work, dim=1, out=absmax).clamp_(min=ABSMAX_FLOOR)
    codes_of(torch.div(blocks, absmax.view(-1, 1), out=work), signed, out=codes)


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """float32 values q[code] * A of `codes` (uint8) with one `absmax` per BLOCK codes."""
    values = qmap(signed).index_select(0, codes.int())
    return values.view(-1, BLOCK).mul_(absmax.view(-1, 1)).view(-1)


@functools.cache
def qmap(signed: bool) -> torch.Tensor:
    """The map, built once and shared: do not modify it."""
    return dynamic_map(signed)
