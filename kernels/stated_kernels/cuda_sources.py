"""The CUDA sources of the stated kernels and the kernel names to instantiate.

The sources live in `stated_kernels/cuda/` (one `.cu` per algorithm, `gradstats.cu`, and
`stated_common.cuh`); their launch ABI is described in `cuda/README.md`. What this module states
about them (pure data, no CUDA needed):

- `KERNELS`: each source and its kernels; `SCHEDULES`: which of them run in the pre-pass, in each
  page pass and between passes (Note [step order] in stated_kernels.spec);
- `FIELD_SLOTS`: the kernel slot of every page field, by the CPU module's `FieldSpec` name;
- `SEGMENT_DTYPE`, `TENSOR_DTYPE`: the two tables; `host_scalars`: the per-step `hp` row.

`stated_kernels.cuda_runner` compiles and launches them with CuPy; this module never imports it.
`stated_kernels.cuda_build` compiles them with NVRTC without a GPU (the build check of the tests).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
from collections.abc import Iterable, Sequence

import numpy as np

HEADER = "stated_common.cuh"

# Elements per tile (every page kernel) and threads per block (every kernel): see the header.
TILE = 2048
THREADS = 256
WARPS = THREADS // 32
# Elements per 8-bit quantization block.
QBLOCK = 256

# C++ spelling of each parameter / state dtype, keyed by torch dtype name.
CXX_TYPES = {"float32": "float", "bfloat16": "__nv_bfloat16", "float16": "__half"}

# Every kernel is a template <P, S>: P the parameter and gradient type, S the floating state type:
# the CPU module's field dtype, which is the tensor's dtype as the algorithm sees it (the
# parameter's, or float32 with master weights). CAME keeps float32 state whatever the parameter.
DTYPE_PAIRS: tuple[tuple[str, str], ...] = (
    ("float32", "float32"),
    ("bfloat16", "bfloat16"),
    ("float16", "float16"),
    ("bfloat16", "float32"),
    ("float16", "float32"),
)

FLOAT_STATE_PAIRS = tuple(pair for pair in DTYPE_PAIRS if pair[1] == "float32")
# gradstats reads gradients only: its kernels are templates on P alone (state None).
PARAM_ONLY_PAIRS: tuple[tuple[str, None], ...] = tuple((p, None) for p in CXX_TYPES)
PAIRS = {"came": FLOAT_STATE_PAIRS, "gradstats": PARAM_ONLY_PAIRS}

# For each source: its file and its kernels. Names ending in _page / _page<k> (and the one-kernel
# algorithms) run over pages; the others over a list of whole tensors.
KERNELS: dict[str, tuple[str, tuple[str, ...]]] = {
    "adamw": ("adamw.cu", ("stated_adamw",)),
    "sgd": ("sgd.cu", ("stated_sgd",)),
    "lion": ("lion.cu", ("stated_lion",)),
    "adamw8bit": ("adamw8bit.cu", ("stated_adamw8bit",)),
    "adafactor": ("adafactor.cu", (
        "stated_adafactor_rows",
        "stated_adafactor_cols",
        "stated_adafactor_row_mean",
        "stated_adafactor_norms",
        "stated_adafactor_finish",
        "stated_adafactor_page0",
        "stated_adafactor_between",
        "stated_adafactor_page1",
    )),
    "came": ("came.cu", (
        "stated_came_rows",
        "stated_came_cols",
        "stated_came_row_mean",
        "stated_came_norms",
        "stated_came_finish",
        "stated_came_page0",
        "stated_came_between",
        "stated_came_between_mean",
        "stated_came_page1",
    )),
    "slimadam": ("slimadam.cu", ("stated_slimadam_reduce", "stated_slimadam_page")),
    "gradstats": ("gradstats.cu", ("stated_gradstats_partial", "stated_gradstats_finish")),
}
# Adam shares AdamW's kernel (ST_DECOUPLED off).
ALIASES = {"adam": "adamw"}


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The launches of one step, in the CPU module's split of the work: tensor-list kernels before
    page pass 0, one page kernel per pass, tensor-list kernels after each pass but the last."""

    pages: tuple[str, ...]
    prepass: tuple[str, ...] = ()
    between: tuple[tuple[str, ...], ...] = ()

    @property
    def passes(self) -> int:
        return len(self.pages)


SCHEDULES: dict[str, Schedule] = {
    "adamw": Schedule(("stated_adamw",)),
    "sgd": Schedule(("stated_sgd",)),
    "lion": Schedule(("stated_lion",)),
    "adamw8bit": Schedule(("stated_adamw8bit",)),
    "adafactor": Schedule(
        ("stated_adafactor_page0", "stated_adafactor_page1"),
        prepass=("stated_adafactor_rows", "stated_adafactor_cols", "stated_adafactor_row_mean",
                 "stated_adafactor_norms", "stated_adafactor_finish"),
        between=(("stated_adafactor_between",),)),
    "came": Schedule(
        ("stated_came_page0", "stated_came_page1"),
        prepass=("stated_came_rows", "stated_came_cols", "stated_came_row_mean", "stated_came_norms",
                 "stated_came_finish"),
        between=(("stated_came_between", "stated_came_between_mean"),)),
    "slimadam": Schedule(("stated_slimadam_page",), prepass=("stated_slimadam_reduce",)),
}
# Tensor-list kernels that do one thread's work per tensor: launched with grid (1, nids).
SINGLE_BLOCK = frozenset({"stated_adafactor_finish", "stated_adafactor_between", "stated_came_finish"})

# Page field slots of each algorithm's page kernels, by the CPU module's FieldSpec name, with the
# dtypes a slot may hold: "S" is the state type, else a torch dtype name. "master" is the daemon's
# float32 master copy (Note [master weights] in stated/session.py).
FIELD_SLOTS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "adamw": (("exp_avg", ("S",)), ("exp_avg_sq", ("S",)), ("max_exp_avg_sq", ("S",)), ("master", ("float32",))),
    "sgd": (("momentum_buffer", ("S",)), ("master", ("float32",))),
    "lion": (("exp_avg", ("S",)), ("master", ("float32",))),
    "adamw8bit": (("exp_avg", ("uint8", "S")), ("exp_avg_sq", ("uint8", "S")), ("max_exp_avg_sq", ("uint8", "S")),
                  ("exp_avg_scale", ("float32",)), ("exp_avg_sq_scale", ("float32",)),
                  ("max_exp_avg_sq_scale", ("float32",)), ("master", ("float32",))),
    "adafactor": (("variance", ("S",)), ("master", ("float32",))),
    "came": (("exp_avg", ("S",)), ("exp_avg_sq", ("S",)), ("master", ("float32",))),
    "slimadam": (("mu", ("S",)), ("nu", ("S",)), ("master", ("float32",))),
}

# Flags (the `flags` argument of page kernels).
MAXIMIZE = 1 << 0
AMSGRAD = 1 << 1
DECOUPLED = 1 << 2
NESTEROV = 1 << 3

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


def resolve(algorithm: str) -> str:
    name = ALIASES.get(algorithm, algorithm)
    if name not in KERNELS:
        raise KeyError(f"no CUDA kernels for algorithm {algorithm!r}; known: {', '.join(sorted(KERNELS))}")
    return name


def _read(filename: str) -> str:
    return importlib.resources.files("stated_kernels").joinpath("cuda", filename).read_text(encoding="utf-8")


def header() -> str:
    return _read(HEADER)


def source(algorithm: str, *, inline_header: bool = True) -> str:
    """The CUDA source of an algorithm; with `inline_header` the shared header is pasted in, so the
    text compiles with no include path other than the one for cuda_bf16.h / cuda_fp16.h."""
    text = _read(KERNELS[resolve(algorithm)][0])
    if inline_header:
        text = text.replace(f'#include "{HEADER}"', header(), 1)
    return text


def _dtype_name(dtype: object) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in CXX_TYPES:
        raise KeyError(f"unsupported dtype {dtype!r} for CUDA kernels; supported: {', '.join(CXX_TYPES)}")
    return name


def kernel_name(kernel: str, param_dtype: object, state_dtype: object | None = None) -> str:
    """The name expression of one instantiation, e.g. `stated_adamw<__nv_bfloat16, float>`; with no
    state dtype (gradstats), `stated_gradstats_partial<float>`."""
    if state_dtype is None:
        return f"{kernel}<{CXX_TYPES[_dtype_name(param_dtype)]}>"
    return f"{kernel}<{CXX_TYPES[_dtype_name(param_dtype)]}, {CXX_TYPES[_dtype_name(state_dtype)]}>"


def dtype_pairs(algorithm: str) -> tuple[tuple[str, str | None], ...]:
    """The (param dtype, state dtype) pairs an algorithm's kernels are instantiated for."""
    return PAIRS.get(resolve(algorithm), DTYPE_PAIRS)


def name_expressions(algorithm: str, pairs: Iterable[tuple[str, str | None]] | None = None) -> list[str]:
    """Every instantiation of every kernel of an algorithm (what CuPy's name_expressions takes)."""
    pairs = dtype_pairs(algorithm) if pairs is None else tuple(pairs)
    return [kernel_name(k, p, s) for k in KERNELS[resolve(algorithm)][1] for p, s in pairs]


def kernel_state_dtype(algorithm: str, state_dtype: object) -> str:
    """S of an algorithm's kernels for tensors the CPU module sees with dtype `state_dtype` (the
    parameter's, or float32 with master weights): CAME keeps float32 state whatever it is."""
    return "float32" if resolve(algorithm) == "came" else _dtype_name(state_dtype)


def include_dirs() -> list[str]:
    """The directory holding cuda_bf16.h and cuda_fp16.h, as a one-element list (empty if none):
    the `nvidia-cuda-runtime-cu12` wheel's include directory, else $CUDA_HOME/include or
    $CUDA_PATH/include, else /usr/local/cuda/include. Only the first is used, so that the headers
    come from one CUDA release (the wheel's matches the NVRTC wheel's)."""
    found = []
    try:
        import nvidia.cuda_runtime as runtime  # the nvidia-cuda-runtime-cu12 wheel

        for base in runtime.__path__:
            found.append(os.path.join(base, "include"))
    except ImportError:
        pass
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            found.append(os.path.join(os.environ[env], "include"))
    found.append("/usr/local/cuda/include")
    usable = [d for d in dict.fromkeys(found) if os.path.isfile(os.path.join(d, "cuda_bf16.h"))]
    return usable[:1]


def nvrtc_options(arch: str | None = None) -> list[str]:
    """NVRTC options every source is built with; `arch` is e.g. "sm_90" or "compute_80" (CuPy
    picks the device's own architecture when it is None)."""
    options = ["-std=c++17"]
    if arch is not None:
        options.append(f"--gpu-architecture={arch}")
    options += [f"-I{d}" for d in include_dirs()]
    return options


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


def _hi_lo(value: float) -> tuple[float, float]:
    """A float64 as two float32 whose sum (in float64) is `value` to about 48 bits."""
    hi = float(np.float32(value))
    return hi, float(np.float32(value - hi))


def _eps1(hp: dict, dtype: str) -> float:
    """Adafactor's eps1: torch's None (negative on the wire) is finfo(dtype).eps."""
    eps1 = hp.get("eps1")
    if eps1 is None or eps1 < 0:
        return {"float32": 2.0**-23, "bfloat16": 2.0**-7, "float16": 2.0**-10}[dtype]
    return float(eps1)


def _adamw8bit_corrections(b1: float, b2: float, step: float) -> tuple[float, float]:
    """bc1 and sqrt(bc2) exactly as the CPU module computes them: `1 - beta ** step` with step a
    float32 tensor, and the IEEE float32 square root."""
    import torch

    t = torch.tensor(float(step), dtype=torch.float32)
    bc1 = (1 - b1**t).item()
    bc2 = np.float32((1 - b2**t).item())
    return bc1, float(np.sqrt(bc2))


def launch_flags(algorithm: str, hp: dict) -> int:
    """The `flags` of a group's page launches (cuda/README.md lists what each kernel reads)."""
    name, algorithm = algorithm, resolve(algorithm)
    if algorithm == "adamw":
        return ((MAXIMIZE if hp.get("maximize") else 0) | (AMSGRAD if hp.get("amsgrad") else 0)
                | (DECOUPLED if name != "adam" else 0))
    if algorithm == "sgd":
        return (MAXIMIZE if hp.get("maximize") else 0) | (NESTEROV if hp.get("nesterov") else 0)
    if algorithm == "adamw8bit":
        return AMSGRAD if hp.get("amsgrad") else 0
    if algorithm == "adafactor":
        return MAXIMIZE if hp.get("maximize") else 0
    return 0  # Lion, CAME and SlimAdam have no maximize (nor do their references)


def _round_to(value: float, dtype: str) -> float:
    """A scalar as ATen hands it to an operation on a `dtype` tensor that converts it to the tensor's
    type (double -> float -> dtype)."""
    if dtype == "float32":
        return value
    import torch

    return float(torch.tensor(value, dtype=torch.float32).to(getattr(torch, dtype)))


# Note [16-bit scalars]: on a 16-bit tensor, ATen converts the scalar of `add(alpha=)`, of a scalar
# `add`, and of the in-place `_foreach_mul_` to the tensor's type, while `mul`, `div`, `lerp`'s weight
# and `_foreach_mul` keep it in float. host_scalars rounds exactly the scalars that the CPU module
# hands to the first kind, so that 16-bit state without master weights follows it.
ROUNDED_TO_STATE = {"sgd": (0, 1, 2, 3), "lion": (0, 2, 3, 4, 5), "slimadam": (1, 3, 4)}


def host_scalars(algorithm: str, hp: dict, step: float, *, numel: int = 1, ndim: int = 1,
                 dtype: object = "float32", grad_multiplier: float = 1.0) -> tuple[np.ndarray, int]:
    """The `hp` row (32 float32) and the `flags` of one tensor for one step, computed in float64 and
    rounded once, as cuda/README.md lists them.

    `hp` holds the group's hyperparameters (the CPU module's names, defaults filled in); `step` is
    the tensor's step after this step's increment (the CPU module's small "step"); `dtype` is the
    tensor's dtype as the CPU module sees it (TensorInfo.dtype: float32 with master weights);
    `grad_multiplier` goes to hp[31] (Note [gradient multiplier] in the header).
    """
    name = algorithm
    algorithm = resolve(algorithm)
    row = np.zeros(N_HP, dtype=np.float32)
    lr = float(hp.get("lr", 0.0))
    wd = float(hp.get("weight_decay", 0.0))
    t = float(step)
    if algorithm == "adamw":
        b1, b2 = float(hp["beta1"]), float(hp["beta2"])
        row[:8] = [1 - b1, b2, 1 - b2, hp["eps"], wd, 1 - lr * wd, -(lr / (1 - b1 ** t)), (1 - b2 ** t) ** 0.5]
    elif algorithm == "sgd":
        row[:5] = [-lr, hp.get("momentum", 0.0), 1 - float(hp.get("dampening", 0.0)), wd, 1.0 if t == 1 else 0.0]
    elif algorithm == "lion":
        decay = wd / float(hp["init_lr"]) if hp.get("decoupled_weight_decay") else wd
        b1, b2 = float(hp["beta1"]), float(hp["beta2"])
        row[:6] = [1.0 - lr * decay, b1, 1 - b1, b2, 1 - b2, -lr]
    elif algorithm == "adamw8bit":
        b1, b2 = float(hp["beta1"]), float(hp["beta2"])
        f32 = np.float32
        # torchao: lr is a float32 tensor, so lr * weight_decay is one float32 multiply.
        bc1, bc2_sqrt = _adamw8bit_corrections(b1, b2, t)
        row[:9] = [lr, f32(lr) * f32(wd), 1 - b1, 1 - b2, hp["eps"], bc1, bc2_sqrt,
                   1.0 if abs(1 - b1) >= 0.5 else 0.0, 1.0 if abs(1 - b2) >= 0.5 else 0.0]
    elif algorithm == "adafactor":
        eps1 = _eps1(hp, _dtype_name(dtype))
        row[:5] = [t ** float(hp.get("beta2_decay", -0.8)), eps1, eps1 * eps1, 1 - lr * wd, wd]
        row[5:7] = _hi_lo(min(lr, 1 / t ** 0.5))
        row[7:9] = _hi_lo(float(hp.get("eps2", 1e-3)))
        row[9:11] = _hi_lo(float(hp.get("d", 1.0)))
    elif algorithm == "came":
        b1, b2, b3 = float(hp["beta1"]), float(hp["beta2"]), float(hp["beta3"])
        row[:13] = [b1, 1 - b1, b2, 1 - b2, b3, 1 - b3, hp.get("eps1", 1e-30), hp.get("eps2", 1e-16),
                    hp.get("clip_threshold", 1.0), lr, -wd * lr, wd, numel ** 0.5]
    elif algorithm == "slimadam":
        b1, b2 = float(hp["beta1"]), float(hp["beta2"])
        if ndim < 2:
            wd = 0.0
        t = int(step)
        row[:10] = [b1, 1 - b1, b2, 1 - b2, hp["eps"], lr, 1 - lr * wd, wd, 1 - b1 ** t, 1 - b2 ** t]
    else:
        raise KeyError(f"{algorithm!r} has no per-step scalars")
    for k in ROUNDED_TO_STATE.get(algorithm, ()):
        row[k] = _round_to(float(row[k]), _dtype_name(dtype))
    row[GRAD_SCALE] = grad_multiplier
    return row, launch_flags(name, hp)
