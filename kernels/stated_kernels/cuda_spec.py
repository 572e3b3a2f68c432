"""What an algorithm declares about its CUDA kernels: a `CudaSpec` (pure data, no CUDA, no torch).

An algorithm module sets `cuda = CudaSpec(...)` on its `Algorithm` and, beside it, the per-step
methods `cuda_scalars`, `cuda_flags` and `cuda_small` (stated_kernels.spec). Everything else --
reading the source, naming instantiations, filling the tables, launching -- is generic:
`cuda_sources` (text and names), `cuda_tables` (the launch tables), `cuda_runner` (CuPy).
The launch ABI every source follows is cuda/README.md.
"""

from __future__ import annotations

import dataclasses
import pathlib

# C++ spelling of each parameter / state dtype, keyed by torch dtype name.
CXX_TYPES = {"float32": "float", "bfloat16": "__nv_bfloat16", "float16": "__half"}

# Every kernel is a template <P, S>: P the parameter and gradient type, S the floating state type:
# the CPU module's field dtype, which is the tensor's dtype as the algorithm sees it (the
# parameter's, or float32 with master weights).
DTYPE_PAIRS: tuple[tuple[str, str], ...] = (
    ("float32", "float32"),
    ("bfloat16", "bfloat16"),
    ("float16", "float16"),
    ("bfloat16", "float32"),
    ("float16", "float32"),
)
FLOAT_STATE_PAIRS = tuple(pair for pair in DTYPE_PAIRS if pair[1] == "float32")
# Kernels that read gradients only (gradstats) are templates on P alone (state None).
PARAM_ONLY_PAIRS: tuple[tuple[str, None], ...] = tuple((p, None) for p in CXX_TYPES)

# Flags (the `flags` argument of page kernels).
MAXIMIZE = 1 << 0
AMSGRAD = 1 << 1
DECOUPLED = 1 << 2
NESTEROV = 1 << 3


def dtype_name(dtype: object) -> str:
    """"float32", "bfloat16" or "float16" for a torch dtype or its name."""
    name = str(dtype).removeprefix("torch.")
    if name not in CXX_TYPES:
        raise KeyError(f"unsupported dtype {dtype!r} for CUDA kernels; supported: {', '.join(CXX_TYPES)}")
    return name


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

    @property
    def kernels(self) -> tuple[str, ...]:
        return self.prepass + self.pages + tuple(k for names in self.between for k in names)


# A page field slot: the CPU module's FieldSpec name and the dtypes the slot may hold ("S" is the
# state type, else a torch dtype name).
Slot = tuple[str, tuple[str, ...]]
# The daemon's float32 master copy, the last slot of every page kernel (Note [master weights] in
# stated/session.py).
MASTER_SLOT: Slot = ("master", ("float32",))


@dataclasses.dataclass(frozen=True)
class CudaSpec:
    """One CUDA source and how the runner drives it.

    `slots` lists the page kernels' field slots in kernel order (MASTER_SLOT last); `pairs` the
    (P, S) instantiations; `single_block` the tensor-list kernels that do one thread's work per
    tensor (grid (1, tensors)); `float_state` makes S float32 whatever the tensor's dtype (CAME);
    `rounded_to_state` the hp indices that ATen rounds to a 16-bit state type (Note [16-bit
    scalars] in cuda_tables); `quant_maps` appends the two dynamic maps to every page launch.
    """

    source: str
    schedule: Schedule
    slots: tuple[Slot, ...] = ()
    pairs: tuple[tuple[str, str | None], ...] = DTYPE_PAIRS
    single_block: frozenset[str] = frozenset()
    float_state: bool = False
    rounded_to_state: tuple[int, ...] = ()
    quant_maps: bool = False

    @property
    def name(self) -> str:
        """The source's stem ("adamw" for adamw.cu): the name the build reports and caches use."""
        return pathlib.PurePath(self.source).stem

    @property
    def kernels(self) -> tuple[str, ...]:
        return self.schedule.kernels

    def state_dtype(self, dtype_name: str) -> str:
        """S for tensors the CPU module sees with dtype `dtype_name`."""
        return "float32" if self.float_state else dtype_name


def fields_slots(*names: str, state: tuple[str, ...] = ("S",)) -> tuple[Slot, ...]:
    """Slots of elementwise state fields of type `state`, then the master copy."""
    return tuple((name, state) for name in names) + (MASTER_SLOT,)
