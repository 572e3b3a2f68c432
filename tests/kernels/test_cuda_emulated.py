"""The CUDA kernels run on the CPU: a C++ emulation of the CUDA features they use (fibers for the 256
threads of a block, switching at __syncthreads and warp shuffles) and a stand-in for the few CuPy
calls cuda_runner makes, so that test_cuda_parity.py's cases run here through the real runner, tables
and kernel sources (built with g++, -ffp-contract=off). It checks indexing, slots, passes and the
math on every machine; what it cannot check (timing, the real compiler's code, memory ordering
between blocks, which the emulation runs one after another) is left to the GPU tests.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import types

import numpy as np
import pytest

import test_cuda_parity as parity
from stated_kernels import cuda_launch
from stated_kernels import cuda_tables as cs
from support.imports import import_from

Device = import_from("tests/gpu", "fake_cupy").Device  # the CUDA backend's CPU tests' stand-in device

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to build the emulated kernels")

EMU_H = r"""// A CPU emulation of the CUDA features the stated kernels use: one OS thread runs the 256 threads of
// a block as fibers (ucontext), switching only at __syncthreads and warp shuffles; blocks run one
// after another. For tests only.
#pragma once
#include <cmath>
#include <math.h>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <utility>
#include <vector>
#include <ucontext.h>

#define __host__
#define __device__
#define __global__
#define __shared__ static
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)

struct uint3 { unsigned x, y, z; };
struct dim3 { unsigned x, y, z; };
struct uint4 { unsigned x, y, z, w; };
struct uint2 { unsigned x, y; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

inline uint3 threadIdx, blockIdx;
inline dim3 gridDim, blockDim;

template <class To, class From> inline To emu_bits(From f) { To t; std::memcpy(&t, &f, sizeof t); return t; }
inline float __uint_as_float(unsigned x) { return emu_bits<float>(x); }
inline unsigned __float_as_uint(float x) { return emu_bits<unsigned>(x); }
inline float __int_as_float(int x) { return emu_bits<float>(x); }
// Built with -ffp-contract=off: plain operations are rounded one by one.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }


namespace emu {
constexpr int N = 256;
struct Fiber { ucontext_t ctx; bool done; int wait; };  // wait: -1 running, 0 block barrier, 1 warp barrier
inline Fiber fibers[N];
inline ucontext_t scheduler;
inline int current = 0;
inline const std::function<void()>* body = nullptr;
inline std::vector<char> stacks;
inline unsigned long long slots[N];

inline void entry() {
    (*body)();
    fibers[current].done = true;
    swapcontext(&fibers[current].ctx, &scheduler);
}

inline void wait(int kind) {
    fibers[current].wait = kind;
    swapcontext(&fibers[current].ctx, &scheduler);
}

inline void run_block(const std::function<void()>& f) {
    body = &f;
    const size_t size = 256 * 1024;
    if (stacks.empty()) stacks.resize(size * N);
    for (int t = 0; t < N; ++t) {
        getcontext(&fibers[t].ctx);
        fibers[t].ctx.uc_stack.ss_sp = stacks.data() + size * t;
        fibers[t].ctx.uc_stack.ss_size = size;
        fibers[t].ctx.uc_link = nullptr;
        makecontext(&fibers[t].ctx, entry, 0);
        fibers[t].done = false;
        fibers[t].wait = -1;
    }
    for (;;) {
        bool ran = false;
        for (int t = 0; t < N; ++t) {
            if (fibers[t].done || fibers[t].wait != -1) continue;
            current = t;
            threadIdx = uint3{(unsigned)t, 0, 0};
            swapcontext(&scheduler, &fibers[t].ctx);
            ran = true;
        }
        bool live = false, released = false;
        for (int t = 0; t < N; ++t) live |= !fibers[t].done;
        if (!live) break;
        for (int w = 0; w < N / 32; ++w) {  // a warp whose live lanes all wait at a shuffle
            bool all = true, any = false;
            for (int t = 32 * w; t < 32 * w + 32; ++t) {
                if (fibers[t].done) continue;
                any = true;
                all &= fibers[t].wait == 1;
            }
            if (any && all) {
                for (int t = 32 * w; t < 32 * w + 32; ++t) if (!fibers[t].done) fibers[t].wait = -1;
                released = true;
            }
        }
        if (!released) {  // the block barrier, once every live thread waits there
            bool all = true;
            for (int t = 0; t < N; ++t) if (!fibers[t].done) all &= fibers[t].wait == 0;
            if (all) {
                for (int t = 0; t < N; ++t) if (!fibers[t].done) fibers[t].wait = -1;
                released = true;
            }
        }
        if (!ran && !released) { std::fprintf(stderr, "emu: deadlock in block (%u, %u)\n", blockIdx.x, blockIdx.y); std::abort(); }
    }
}

inline void launch(unsigned gx, unsigned gy, const std::function<void()>& f) {
    gridDim = dim3{gx, gy, 1};
    blockDim = dim3{N, 1, 1};
    for (unsigned y = 0; y < gy; ++y)
        for (unsigned x = 0; x < gx; ++x) {
            blockIdx = uint3{x, y, 0};
            run_block(f);
        }
}
}  // namespace emu

inline void __syncthreads() { emu::wait(0); }

template <class T> inline T __shfl_xor_sync(unsigned, T value, int mask) {
    const int t = emu::current;
    std::memcpy(&emu::slots[t], &value, sizeof value);
    emu::wait(1);
    T out;
    std::memcpy(&out, &emu::slots[(t & ~31) | ((t & 31) ^ mask)], sizeof out);
    emu::wait(1);
    return out;
}

template <class T> inline T atomicAdd(T* p, T v) { T old = *p; *p = old + v; return old; }

template <class... A, std::size_t... I>
inline void emu_call(void (*k)(A...), void** args, std::index_sequence<I...>) {
    k(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(args[I])...);
}
template <class... A>
inline void emu_run(void (*k)(A...), unsigned gx, unsigned gy, void** args) {
    emu::launch(gx, gy, [&] { emu_call(k, args, std::index_sequence_for<A...>{}); });
}
"""
BF16_H = r"""#pragma once
#include "cuda_emu.h"
struct __nv_bfloat16 { unsigned short x; };
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    unsigned u = emu_bits<unsigned>(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{(unsigned short)((u >> 16) | 0x40)};
    u += 0x7fffu + ((u >> 16) & 1u);
    return __nv_bfloat16{(unsigned short)(u >> 16)};
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.x; }
"""
FP16_H = r"""#pragma once
#include "cuda_emu.h"
struct __half { unsigned short x; };
inline __half __float2half_rn(float f) { _Float16 h = (_Float16)f; return __half{emu_bits<unsigned short>(h)}; }
inline float __half2float(__half h) { return (float)emu_bits<_Float16>(h.x); }
inline __half __ushort_as_half(unsigned short x) { return __half{x}; }
inline unsigned short __half_as_ushort(__half h) { return h.x; }
"""


def _cache_dir() -> str:
    path = os.path.join(tempfile.gettempdir(), f"stated-cuda-emu-{os.getuid()}")
    os.makedirs(os.path.join(path, "include"), exist_ok=True)
    for name, text in (("cuda_emu.h", EMU_H), ("cuda_bf16.h", BF16_H), ("cuda_fp16.h", FP16_H)):
        target = os.path.join(path, "include", name)
        if not os.path.exists(target) or open(target).read() != text:
            with open(target, "w") as f:
                f.write(text)
    return path


class Module:
    """cupy.RawModule: the source and one extern "C" entry per name expression, built into a shared
    library (cached by the hash of its text)."""

    def __init__(self, code: str, options=(), name_expressions=()):
        self.names = list(name_expressions)
        entries = "\n".join(f'extern "C" void emu_{i}(unsigned gx, unsigned gy, void** a) {{ emu_run(&{n}, gx, gy, a); }}'
                            for i, n in enumerate(self.names))
        text = code + "\n" + entries + "\n"
        base = _cache_dir()
        key = hashlib.sha256((text + EMU_H + BF16_H + FP16_H).encode()).hexdigest()[:24]
        library = os.path.join(base, f"{key}.so")
        if not os.path.exists(library):
            source = os.path.join(base, f"{key}.cpp")
            with open(source, "w") as f:
                f.write(text)
            partial = library + f".{os.getpid()}"
            subprocess.run(["g++", "-std=c++20", "-O1", "-ffp-contract=off", "-shared", "-fPIC", "-w",
                            "-I" + os.path.join(base, "include"), source, "-o", partial], check=True)
            os.replace(partial, library)
        self.library = ctypes.CDLL(library)

    def get_function(self, name: str):
        entry = getattr(self.library, f"emu_{self.names.index(name)}")
        entry.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.POINTER(ctypes.c_void_p)]
        return Function(entry)


_CTYPES = {np.dtype(np.uint64): ctypes.c_uint64, np.dtype(np.int32): ctypes.c_int32,
           np.dtype(np.uint32): ctypes.c_uint32, np.dtype(np.float32): ctypes.c_float}


class Function:
    def __init__(self, entry):
        self.entry = entry

    def __call__(self, grid, block, args, shared_mem=0):
        assert tuple(block) == (cs.THREADS,)
        grid = tuple(grid) + (1,) * (2 - len(grid))
        values = [_CTYPES[np.asarray(a).dtype](a.item()) for a in args]  # numpy scalars, as the runner passes
        pointers = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values])
        self.entry(grid[0], grid[1], pointers)


class Memory:
    def __init__(self, array: np.ndarray):
        self.array = array

    @property
    def ptr(self) -> int:
        return self.array.ctypes.data


class Array:
    """cupy.ndarray: host memory whose address the emulated kernels use as a device address."""

    def __init__(self, array: np.ndarray):
        self._array = np.ascontiguousarray(array).copy()
        self.data = Memory(self._array)
        self.dtype, self.shape, self.size = self._array.dtype, self._array.shape, self._array.size

    def set(self, values: np.ndarray) -> None:
        assert values.dtype == self.dtype and values.size == self.size
        self._array[...] = values.reshape(self.shape)


def fake_cupy() -> types.ModuleType:
    cp = types.ModuleType("cupy")
    cp.STATED_EMULATED = True
    cp.RawModule = Module
    cp.asarray = lambda a: Array(np.asarray(a))
    cp.asnumpy = lambda a: a._array.copy()
    cp.zeros = lambda n, dtype: Array(np.zeros(n, dtype=dtype))
    cp.empty = lambda n, dtype: Array(np.zeros(n, dtype=dtype))  # zeros: deterministic garbage
    for name in ("uint8", "uint32", "int32", "int64", "float32", "float64"):
        setattr(cp, name, getattr(np, name))
    cp.cuda = types.SimpleNamespace(Device=Device, runtime=types.SimpleNamespace(getDeviceCount=lambda: 0))
    return cp


@pytest.fixture
def emulated(monkeypatch):
    """cuda_runner with the emulation in place of CuPy (and the compile cache emptied around the test)."""
    cp = fake_cupy()
    monkeypatch.setitem(sys.modules, "cupy", cp)
    monkeypatch.setattr(cuda_launch, "_MODULES", {})
    monkeypatch.setattr(cuda_launch, "_FUNCTIONS", {})
    return cp


# Every configuration in float32 and in bf16 with master weights; the 16-bit modes without master
# weights for a few (each dtype pair is one more build).
CASES = [(config, "float32", False) for config in parity.CONFIGS] + \
        [(config, "bfloat16", True) for config in parity.CONFIGS] + \
        [(config, pdtype, False) for config in ("adamw", "sgd-momentum", "lion", "adamw8bit", "adafactor", "came",
                                                "slimadam") for pdtype in ("bfloat16", "float16")]


@pytest.mark.slow
@pytest.mark.parametrize("config,pdtype,master", CASES)
def test_emulated_kernels_match_the_cpu_module(emulated, config, pdtype, master):
    pr = parity.make_problem(config, pdtype, master)
    start = parity.initial_state(pr)
    parity.compare(pr, parity.run_gpu(pr, start, range(parity.STEPS), emulated),
                   parity.run_cpu(pr, start, range(parity.STEPS)))


@pytest.mark.slow
@pytest.mark.parametrize("config", ["adafactor", "came", "slimadam", "adamw8bit-amsgrad"])
def test_emulated_state_crosses_between_cpu_and_gpu(emulated, config):
    pr = parity.make_problem(config, "float32", False, steps=4)
    start = parity.initial_state(pr)
    cpu = parity.run_cpu(pr, start, range(4))
    parity.compare(pr, parity.run_gpu(pr, parity.run_cpu(pr, start, range(2)), range(2, 4), emulated), cpu)
    parity.compare(pr, parity.run_cpu(pr, parity.run_gpu(pr, start, range(2), emulated), range(2, 4)), cpu)
