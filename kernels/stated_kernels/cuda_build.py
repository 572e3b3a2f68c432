"""The NVRTC build check of the CUDA sources: compiles every source for an architecture through
cuda-python, which needs no GPU. It is how the tests check that the sources build for sm_80 and sm_90
on a machine without one (`python -m stated_kernels.cuda_build sm_80 sm_90`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import re
import time
from collections.abc import Iterable, Sequence

from stated_kernels.cuda_sources import (
    HEADER,
    header,
    include_dirs,
    kernel_set,
    kernel_sets,
    name_expressions,
    nvrtc_options,
    source,
)


@dataclasses.dataclass
class SourceReport:
    algorithm: str
    filename: str
    arch: str
    ok: bool
    seconds: float
    log: str
    lowered: dict[str, str]  # name expression -> mangled name ("" when it did not resolve)
    code_bytes: int

    @property
    def missing(self) -> list[str]:
        return [n for n, low in self.lowered.items() if not low]


@dataclasses.dataclass
class CompileReport:
    arch: str
    nvrtc_version: tuple[int, int]
    sources: list[SourceReport]

    @property
    def ok(self) -> bool:
        return all(s.ok and not s.missing for s in self.sources)

    def summary(self) -> str:
        lines = [f"NVRTC {self.nvrtc_version[0]}.{self.nvrtc_version[1]}, {self.arch}:"]
        for s in self.sources:
            state = "ok" if s.ok and not s.missing else "FAILED"
            lines.append(f"  {s.filename:14s} {state:6s} {len(s.lowered):3d} kernels {s.code_bytes:8d} bytes "
                         f"{s.seconds:5.2f} s")
            if s.log.strip() and state != "ok":
                lines.append("    " + s.log.strip().replace("\n", "\n    "))
        return "\n".join(lines)


def _nvrtc():
    try:
        from cuda.bindings import nvrtc  # cuda-python >= 12.6
    except ImportError:  # older cuda-python
        from cuda import nvrtc
    return nvrtc


def _check(nvrtc, result, what: str):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise RuntimeError(f"{what} failed: {err}")
    return rest[0] if len(rest) == 1 else rest


def nvrtc_version() -> tuple[int, int]:
    nvrtc = _nvrtc()
    major, minor = _check(nvrtc, nvrtc.nvrtcVersion(), "nvrtcVersion")
    return int(major), int(minor)


def compile_source(algorithm: str, arch: str = "sm_80", extra_options: Sequence[str] = ()) -> SourceReport:
    """Compiles one algorithm's source with every name expression; never raises on a build error
    (the report says what failed), only when NVRTC itself is missing."""
    nvrtc = _nvrtc()
    spec = kernel_set(algorithm)
    algorithm, filename = spec.name, spec.source
    names = name_expressions(algorithm)
    started = time.perf_counter()
    text = source(algorithm, inline_header=False).encode()
    prog = _check(nvrtc, nvrtc.nvrtcCreateProgram(text, filename.encode(), 1, [header().encode()],
                                                  [HEADER.encode()]), "nvrtcCreateProgram")
    try:
        for name in names:
            _check(nvrtc, nvrtc.nvrtcAddNameExpression(prog, name.encode()), f"nvrtcAddNameExpression({name})")
        options = [o.encode() for o in (*nvrtc_options(arch), *extra_options)]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(options), options)
        ok = err == nvrtc.nvrtcResult.NVRTC_SUCCESS
        size = _check(nvrtc, nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
        # NVRTC writes into the buffer: a fresh one. b" " * 1 would be CPython's shared one-byte b" ", and an
        # empty log (its NUL) would turn every b" " of the process into b"\0".
        log = bytes(size)
        _check(nvrtc, nvrtc.nvrtcGetProgramLog(prog, log), "nvrtcGetProgramLog")
        lowered: dict[str, str] = {}
        code_bytes = 0
        if ok:
            for name in names:
                err, low = nvrtc.nvrtcGetLoweredName(prog, name.encode())
                lowered[name] = low.decode() if err == nvrtc.nvrtcResult.NVRTC_SUCCESS and low else ""
            if arch.startswith("sm_"):
                code_bytes = int(_check(nvrtc, nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize"))
            else:
                code_bytes = int(_check(nvrtc, nvrtc.nvrtcGetPTXSize(prog), "nvrtcGetPTXSize"))
        else:
            lowered = {name: "" for name in names}
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    return SourceReport(algorithm, filename, arch, ok, time.perf_counter() - started,
                        log.rstrip(b"\0 ").decode(errors="replace"), lowered, code_bytes)


def compile_all(arch: str = "sm_80", algorithms: Iterable[str] | None = None,
                extra_options: Sequence[str] = (), workers: int | None = None) -> CompileReport:
    """Compiles every source for `arch` ("sm_80", "sm_90", "compute_80", ...) without a GPU."""
    return compile_archs([arch], algorithms, extra_options, workers)[0]


def compile_archs(archs: Sequence[str], algorithms: Iterable[str] | None = None,
                  extra_options: Sequence[str] = (), workers: int | None = None) -> list[CompileReport]:
    """Compiles every source for each architecture, one report per architecture.

    NVRTC releases the GIL while it compiles, so the (source, arch) jobs run on a thread pool of
    `workers` threads (default: one per CPU core).
    """
    for arch in archs:
        if not re.fullmatch(r"(sm|compute)_\d+a?", arch):
            raise ValueError(f"arch must look like sm_90 or compute_80, got {arch!r}")
    if not include_dirs():
        raise RuntimeError("cuda_bf16.h not found: install nvidia-cuda-runtime-cu12 or set CUDA_HOME")
    chosen = [kernel_set(a).name for a in (algorithms if algorithms is not None else kernel_sets())]
    jobs = [(a, arch) for arch in archs for a in chosen]
    workers = workers or os.cpu_count() or 1
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
        done = list(pool.map(lambda job: compile_source(job[0], job[1], extra_options), jobs))
    version = nvrtc_version()
    return [CompileReport(arch, version, [r for r in done if r.arch == arch]) for arch in archs]


if __name__ == "__main__":  # python -m stated_kernels.cuda_build [arch ...]
    import sys

    reports = compile_archs(sys.argv[1:] or ["sm_80", "sm_90"])
    for report in reports:
        print(report.summary())
    sys.exit(0 if all(r.ok for r in reports) else 1)
