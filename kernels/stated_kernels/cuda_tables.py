"""The launch tables every stated kernel reads, and the per-step scalars of a tensor row (pure data:
numpy, no CUDA). Their layout is StSegment / StTensor in cuda/stated_common.cuh (cuda/README.md).

`host_scalars` is generic: the numbers come from the algorithm's `cuda_scalars` and `cuda_flags`
(stated_kernels.spec), this module only places and rounds them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from stated_kernels.cuda_spec import dtype_name

# Elements per tile (every page kernel) and threads per block (every kernel): see the header.
TILE = 2048
THREADS = 256

MAX_FIELDS = 10
N_SMALL = 8
N_HP = 32
# hp[GRAD_SCALE] of a tensor row multiplies every gradient value the kernels read.
GRAD_SCALE = N_HP - 1
# Blocks along x of a tensor-list launch: one per tile of the largest tensor, at most this many.
MAX_LIST_BLOCKS = 1024
# Most tensors in one tensor-list launch (grid y).
MAX_LIST_TENSORS = 65535

# One row of the segment table (StSegment in the header): 128 bytes.
SEGMENT_DTYPE = np.dtype([
    ("param", "<i8"),
    ("grad", "<i8"),
    ("length", "<i8"),
    ("start", "<i8"),
    ("tensor", "<i8"),
    ("tile0", "<i8"),
    ("field", "<i8", (MAX_FIELDS,)),
])
# One row of the tensor table (StTensor in the header): 256 bytes.
TENSOR_DTYPE = np.dtype([
    ("param", "<i8"),
    ("grad", "<i8"),
    ("numel", "<i8"),
    ("kind", "<i8"),
    ("rows", "<i8"),
    ("cols", "<i8"),
    ("lead", "<i8"),
    ("reserved", "<i8"),
    ("small", "<u8", (N_SMALL,)),
    ("hp", "<f4", (N_HP,)),
])
assert SEGMENT_DTYPE.itemsize == 128 and TENSOR_DTYPE.itemsize == 256


# --- tables ---------------------------------------------------------------------------------------


def tiles(length: int) -> int:
    return -(-length // TILE)


def segment_table(segments: Sequence[dict]) -> np.ndarray:
    """Packs segment descriptions into the segment table, filling `tile0`.

    Each entry has keys param, grad, length, start, tensor (ints) and fields (a sequence of byte
    offsets in the page, None or -1 for an absent field, in the kernel's field order).
    """
    table = np.zeros(len(segments), dtype=SEGMENT_DTYPE)
    tile = 0
    for row, seg in zip(table, segments):
        if seg["length"] <= 0:
            raise ValueError(f"segment of tensor {seg['tensor']} has length {seg['length']}")
        fields = [(-1 if f is None else int(f)) for f in seg.get("fields", ())]
        if len(fields) > MAX_FIELDS:
            raise ValueError(f"a segment has at most {MAX_FIELDS} fields, got {len(fields)}")
        row["param"], row["grad"] = seg["param"], seg["grad"]
        row["length"], row["start"], row["tensor"] = seg["length"], seg["start"], seg["tensor"]
        row["tile0"] = tile
        row["field"][:] = -1
        row["field"][: len(fields)] = fields
        tile += tiles(int(seg["length"]))
    return table


def total_tiles(table: np.ndarray) -> int:
    if len(table) == 0:
        return 0
    return int(table["tile0"][-1]) + tiles(int(table["length"][-1]))


def list_blocks(max_numel: int) -> int:
    """Grid x of a tensor-list launch whose largest tensor has `max_numel` elements."""
    return max(1, min(MAX_LIST_BLOCKS, tiles(max_numel)))


def tensor_table(count: int) -> np.ndarray:
    """A zeroed tensor table of `count` rows (small addresses 0, hp 0)."""
    return np.zeros(count, dtype=TENSOR_DTYPE)



# --- per-step scalars -----------------------------------------------------------------------------


def hi_lo(value: float) -> tuple[float, float]:
    """A float64 as two float32 whose sum (in float64) is `value` to about 48 bits."""
    hi = float(np.float32(value))
    return hi, float(np.float32(value - hi))


def round_to(value: float, dtype: str) -> float:
    """A scalar as ATen hands it to an operation on a `dtype` tensor that converts it to the tensor's
    type (double -> float -> dtype)."""
    if dtype == "float32":
        return value
    import torch

    return float(torch.tensor(value, dtype=torch.float32).to(getattr(torch, dtype)))


# Note [16-bit scalars]: on a 16-bit tensor, ATen converts the scalar of `add(alpha=)`, of a scalar
# `add`, and of the in-place `_foreach_mul_` to the tensor's type, while `mul`, `div`, `lerp`'s weight
# and `_foreach_mul` keep it in float. host_scalars rounds exactly the scalars that the CPU module
# hands to the first kind (CudaSpec.rounded_to_state), so that 16-bit state without master weights
# follows it.


def host_scalars(algorithm, hp: dict, step: float, *, numel: int = 1, ndim: int = 1,
                 dtype: object = "float32", grad_multiplier: float = 1.0) -> tuple[np.ndarray, int]:
    """The `hp` row (32 float32) and the `flags` of one tensor for one step, computed in float64 and
    rounded once, as cuda/README.md lists them.

    `algorithm` is an Algorithm or its name; `hp` holds the group's hyperparameters (the CPU module's
    names, defaults filled in); `step` is the tensor's step after this step's increment (the CPU
    module's small "step"); `dtype` is the tensor's dtype as the CPU module sees it (TensorInfo.dtype:
    float32 with master weights); `grad_multiplier` goes to hp[31] (Note [gradient multiplier] in
    the header).
    """
    if isinstance(algorithm, str):
        from stated_kernels import ALGORITHMS

        if algorithm not in ALGORITHMS or ALGORITHMS[algorithm].cuda is None:
            raise KeyError(f"{algorithm!r} has no per-step scalars")
        algorithm = ALGORITHMS[algorithm]
    name = dtype_name(dtype)
    row = np.zeros(N_HP, dtype=np.float32)
    values = algorithm.cuda_scalars(hp, float(step), numel=numel, ndim=ndim, dtype=name)
    if len(values) >= GRAD_SCALE:
        raise ValueError(f"{algorithm.name}: {len(values)} scalars, the hp row holds {GRAD_SCALE}")
    row[:len(values)] = values
    for k in algorithm.cuda.rounded_to_state:
        row[k] = round_to(float(row[k]), name)
    row[GRAD_SCALE] = grad_multiplier
    return row, algorithm.cuda_flags(hp)
