"""The CUDA sources of the stated kernels: their text, the instantiations to build, NVRTC's options.

The sources live in `stated_kernels/cuda/` (one `.cu` per algorithm, `gradstats.cu`, and
`stated_common.cuh`); their launch ABI is described in `cuda/README.md`. Which source an algorithm
has, its kernels and their schedule are declared on the algorithm itself (`Algorithm.cuda`, a
stated_kernels.cuda_spec.CudaSpec); this module reads those declarations, and holds none.

`stated_kernels.cuda_runner` compiles and launches them with CuPy; this module never imports it.
`stated_kernels.cuda_build` compiles them with NVRTC without a GPU (the build check of the tests).
"""

from __future__ import annotations

import importlib.resources
import os
from collections.abc import Iterable

from stated_kernels.cuda_spec import CXX_TYPES, PARAM_ONLY_PAIRS, CudaSpec, Schedule, dtype_name

HEADER = "stated_common.cuh"

# The gradient checks' reductions (Note [gradient checks] in stated/backends/base.py): two
# tensor-list kernels, not an algorithm.
GRADSTATS = CudaSpec("gradstats.cu", Schedule((), prepass=("stated_gradstats_partial", "stated_gradstats_finish")),
                     pairs=PARAM_ONLY_PAIRS)


def kernel_sets() -> dict[str, CudaSpec]:
    """Every source by its name: each algorithm's (Adam shares AdamW's), and gradstats."""
    from stated_kernels import ALGORITHMS

    sets = {a.cuda.name: a.cuda for a in ALGORITHMS.values() if a.cuda is not None}
    sets[GRADSTATS.name] = GRADSTATS
    return sets


def kernel_set(name: str) -> CudaSpec:
    """The CudaSpec of an algorithm ("adam") or of a source ("gradstats")."""
    from stated_kernels import ALGORITHMS

    algorithm = ALGORITHMS.get(name)
    if algorithm is not None and algorithm.cuda is not None:
        return algorithm.cuda
    sets = kernel_sets()
    if name not in sets:
        raise KeyError(f"no CUDA kernels for algorithm {name!r}; known: {', '.join(sorted(sets))}")
    return sets[name]


def _read(filename: str) -> str:
    return importlib.resources.files("stated_kernels").joinpath("cuda", filename).read_text(encoding="utf-8")


def header() -> str:
    return _read(HEADER)


def source(name: str, *, inline_header: bool = True) -> str:
    """The CUDA source of an algorithm or source name; with `inline_header` the shared header is
    pasted in, so the text compiles with no include path other than the one for cuda_bf16.h /
    cuda_fp16.h."""
    text = _read(kernel_set(name).source)
    if inline_header:
        text = text.replace(f'#include "{HEADER}"', header(), 1)
    return text


def kernel_name(kernel: str, param_dtype: object, state_dtype: object | None = None) -> str:
    """The name expression of one instantiation, e.g. `stated_adamw<__nv_bfloat16, float>`; with no
    state dtype (gradstats), `stated_gradstats_partial<float>`."""
    if state_dtype is None:
        return f"{kernel}<{CXX_TYPES[dtype_name(param_dtype)]}>"
    return f"{kernel}<{CXX_TYPES[dtype_name(param_dtype)]}, {CXX_TYPES[dtype_name(state_dtype)]}>"


def dtype_pairs(name: str) -> tuple[tuple[str, str | None], ...]:
    """The (param dtype, state dtype) pairs a source's kernels are instantiated for."""
    return kernel_set(name).pairs


def name_expressions(name: str, pairs: Iterable[tuple[str, str | None]] | None = None) -> list[str]:
    """Every instantiation of every kernel of a source (what CuPy's name_expressions takes)."""
    spec = kernel_set(name)
    pairs = spec.pairs if pairs is None else tuple(pairs)
    return [kernel_name(k, p, s) for k in spec.kernels for p, s in pairs]


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
