// Shared pieces of every stated CUDA kernel: the launch ABI (segment and tensor tables), dtype
// codecs with fp32 math, vectorized item loads, tile iteration and block reductions.
//
// Note [kernel ABI] (README.md in this directory has the full table)
//
// A page kernel updates the segments of ONE page that belong to ONE param group and share one
// parameter dtype. Its arguments always begin with
//
//     const StSegment* segs, int nseg, const StTensor* tensors,
//     P* param_arena, const P* grad_arena, unsigned char* page, unsigned flags
//
// - `segs[nseg]` (device memory, 128 bytes each) describes the segments: element offsets of the
//   segment in the param and grad arenas (relative to `param_arena` / `grad_arena`), its length, its
//   first element's index inside its tensor, its row in the tensor table, the index of its first
//   tile, and the byte offset of every state field inside the page buffer (-1 when absent). These
//   are fixed for a page: a backend can upload a page's table once and keep it.
// - `tensors` (device memory, 256 bytes a row) is the session's tensor table: where each whole
//   tensor lies in the arenas, its shape class, the device addresses of its resident per-tensor
//   buffers (small state and scratch), and 32 float scalars that the host recomputes every step
//   (hyperparameters and bias corrections, computed in float64 and rounded once; hp[31] is the
//   gradient multiplier, Note [gradient multiplier]). One upload per step, shared by every launch
//   of that step.
// - `page` is the base of the page's state buffer on the device (the staging slot it sits in).
// - Work is cut into tiles of ST_TILE consecutive elements of one segment; segment k covers tiles
//   [tile0_k, tile0_k + ceil(length_k / ST_TILE)). Blocks are ST_THREADS threads; each block walks
//   tiles blockIdx.x, blockIdx.x + gridDim.x, ... so any grid size is correct; the natural grid is
//   the total tile count (capped by the backend if it likes). Each thread handles ST_ITEMS
//   consecutive elements of a tile.
//
// Tensor-list kernels (the reductions before a page pass, and between passes) take
//
//     const int* ids, int nids, const StTensor* tensors, const P* param_arena, const P* grad_arena,
//     unsigned flags
//
// with blockIdx.y selecting tensor ids[blockIdx.y] and blockIdx.x striding over that tensor's work.
// No tensor-list kernel reads `flags` (what they compute does not depend on the sign of g), so one
// launch may cover the tensors of several groups.
//
// Note [gradient multiplier]: every kernel that reads a gradient multiplies each value by the
// float32 hp[ST_GRAD_SCALE] (= hp[31]) of its tensor row before anything else, maximize included.
// The daemon puts 1 / loss scale times the clipping coefficient there (1.0: unchanged). The product
// is taken in float32 and not rounded to P: for float32 gradients, and for any power-of-two
// multiplier, it equals multiplying the gradient arena in place first.

#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace stated {

constexpr int ST_TILE = 2048;       // elements per tile, a multiple of the 8-bit block (256)
constexpr int ST_THREADS = 256;     // threads per block of every kernel in this directory
constexpr int ST_ITEMS = ST_TILE / ST_THREADS;  // consecutive elements per thread (8)
constexpr int ST_MAX_FIELDS = 10;
constexpr int ST_HP = 32;
constexpr int ST_SMALL = 8;
constexpr int ST_WARPS = ST_THREADS / 32;
constexpr int ST_GRAD_SCALE = ST_HP - 1;  // hp index of the gradient multiplier

struct StSegment {                  // 128 bytes, little-endian, all int64
    long long param;                // element offset of the segment's first element in the param arena
    long long grad;                 // element offset of the segment's first element in the grad arena
    long long length;               // elements in the segment
    long long start;                // index of the segment's first element inside its tensor
    long long tensor;               // row of the tensor table
    long long tile0;                // first tile: sum of ceil(length / ST_TILE) over earlier segments
    long long field[ST_MAX_FIELDS]; // byte offset of each state field in the page buffer, -1 if absent
};

struct StTensor {                   // 256 bytes
    long long param;                // element offset of the tensor's element 0 in the param arena
    long long grad;                 // element offset of the tensor's element 0 in the grad arena
    long long numel;
    long long kind;                 // algorithm-specific class: 0 plain, 1 factored/quantized/compressed
    long long rows;                 // factored: n = size(-2)    SlimAdam: mid (product of the K dims)
    long long cols;                 // factored: m = size(-1)    SlimAdam: inner (dims after K)
    long long lead;                 // factored: L = numel/(n*m) SlimAdam: outer (dims before K)
    long long reserved;
    unsigned long long small[ST_SMALL];  // device addresses of resident per-tensor buffers, 0 if none
    float hp[ST_HP];                // per-step scalars, meaning per algorithm (README.md)
};

static_assert(sizeof(StSegment) == 128, "StSegment must stay 128 bytes");
static_assert(sizeof(StTensor) == 256, "StTensor must stay 256 bytes");

// The two parameter lists of Note [kernel ABI], spelled once: a page kernel is declared
// `name(ST_PAGE_PARAMS(P))`, a tensor-list kernel `name(ST_LIST_PARAMS(P))`.
#define ST_PAGE_PARAMS(P)                                                                             \
    const StSegment* __restrict__ segs, int nseg, const StTensor* __restrict__ tensors,               \
        P* __restrict__ param_arena, const P* __restrict__ grad_arena, unsigned char* __restrict__ page, \
        unsigned flags
#define ST_LIST_PARAMS(P)                                                                \
    const int* __restrict__ ids, int nids, const StTensor* __restrict__ tensors,         \
        const P* __restrict__ param_arena, const P* __restrict__ grad_arena, unsigned flags

// Flags shared by several kernels (a kernel reads only the ones it documents).
constexpr unsigned ST_MAXIMIZE = 1u << 0;
constexpr unsigned ST_AMSGRAD = 1u << 1;
constexpr unsigned ST_DECOUPLED = 1u << 2;
constexpr unsigned ST_NESTEROV = 1u << 3;

// ---- dtype codecs: every value is decoded to float, computed in float, encoded once ----------

template <typename T> struct Codec;

template <> struct Codec<float> {
    using Raw = unsigned int;
    static __device__ __forceinline__ float decode(Raw r) { return __uint_as_float(r); }
    static __device__ __forceinline__ Raw encode(float x) { return __float_as_uint(x); }
};

template <> struct Codec<__nv_bfloat16> {
    using Raw = unsigned short;
    // bf16 is the top half of a float: widening is exact.
    static __device__ __forceinline__ float decode(Raw r) { return __uint_as_float(((unsigned int)r) << 16); }
    // Round to nearest even, as torch's float -> bfloat16 conversion.
    static __device__ __forceinline__ Raw encode(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }
};

template <> struct Codec<__half> {
    using Raw = unsigned short;
    static __device__ __forceinline__ float decode(Raw r) { return __half2float(__ushort_as_half(r)); }
    static __device__ __forceinline__ Raw encode(float x) { return __half_as_ushort(__float2half_rn(x)); }
};

template <typename T> __device__ __forceinline__ float to_float(T x) {
    return Codec<T>::decode(*reinterpret_cast<const typename Codec<T>::Raw*>(&x));
}

template <typename T> __device__ __forceinline__ T from_float(float x) {
    typename Codec<T>::Raw r = Codec<T>::encode(x);
    return *reinterpret_cast<const T*>(&r);
}

// Lane k of a group of ST_ITEMS raw values packed into 32-bit words (little-endian), for 4- and
// 2-byte raw types. (No `if constexpr`: the sources build as C++11 too, whatever -std a caller adds.)
template <int BYTES> struct Lanes;
template <> struct Lanes<4> {
    static __device__ __forceinline__ unsigned int get(const unsigned int* w, int k) { return w[k]; }
    static __device__ __forceinline__ void put(unsigned int* w, int k, unsigned int bits) { w[k] = bits; }
};
template <> struct Lanes<2> {
    static __device__ __forceinline__ unsigned int get(const unsigned int* w, int k) {
        return (w[k >> 1] >> (16 * (k & 1))) & 0xffffu;
    }
    static __device__ __forceinline__ void put(unsigned int* w, int k, unsigned int bits) {
        if (k & 1) w[k >> 1] |= bits << 16; else w[k >> 1] = bits;
    }
};

// ---- item loads and stores: ST_ITEMS consecutive values of one thread ------------------------
//
// `vec` says that every pointer of the tile is 16-byte aligned (8 for uint8 codes); then a full
// group of ST_ITEMS values moves as 128-bit words. A partial group (the segment's tail) or an
// unaligned segment moves one value at a time. Lanes past `n` read as 0 and are not written.

// The one-value-at-a-time paths are out of line: they run only for tails and unaligned segments,
// and keeping one copy per type (not one per call site) halves the build time of every kernel.
struct Items { float v[ST_ITEMS]; };

template <typename T>
__device__ __noinline__ Items load_items_slow(const T* p, int n) {
    using Raw = typename Codec<T>::Raw;
    const Raw* r = reinterpret_cast<const Raw*>(p);
    Items out;
#pragma unroll
    for (int k = 0; k < ST_ITEMS; ++k) out.v[k] = k < n ? Codec<T>::decode(r[k]) : 0.0f;
    return out;
}

template <typename T>
__device__ __noinline__ void store_items_slow(T* p, int n, Items in) {
    using Raw = typename Codec<T>::Raw;
    Raw* r = reinterpret_cast<Raw*>(p);
#pragma unroll
    for (int k = 0; k < ST_ITEMS; ++k) if (k < n) r[k] = Codec<T>::encode(in.v[k]);
}

template <typename T>
__device__ __forceinline__ void load_items(const T* p, int n, bool vec, float (&out)[ST_ITEMS]) {
    using Raw = typename Codec<T>::Raw;
    const Raw* r = reinterpret_cast<const Raw*>(p);
    if (vec && n == ST_ITEMS) {
        constexpr int WORDS = sizeof(Raw) * ST_ITEMS / 16;  // 2 for fp32, 1 for 16-bit types
        unsigned int w[WORDS * 4];
#pragma unroll
        for (int c = 0; c < WORDS; ++c) {
            uint4 q = reinterpret_cast<const uint4*>(r)[c];
            w[4 * c] = q.x; w[4 * c + 1] = q.y; w[4 * c + 2] = q.z; w[4 * c + 3] = q.w;
        }
#pragma unroll
        for (int k = 0; k < ST_ITEMS; ++k) out[k] = Codec<T>::decode((Raw)Lanes<sizeof(Raw)>::get(w, k));
    } else {
        const Items slow = load_items_slow<T>(p, n);
#pragma unroll
        for (int k = 0; k < ST_ITEMS; ++k) out[k] = slow.v[k];
    }
}

template <typename T>
__device__ __forceinline__ void store_items(T* p, int n, bool vec, const float (&in)[ST_ITEMS]) {
    using Raw = typename Codec<T>::Raw;
    Raw* r = reinterpret_cast<Raw*>(p);
    if (vec && n == ST_ITEMS) {
        constexpr int WORDS = sizeof(Raw) * ST_ITEMS / 16;
        unsigned int w[WORDS * 4];
#pragma unroll
        for (int k = 0; k < ST_ITEMS; ++k) Lanes<sizeof(Raw)>::put(w, k, (unsigned int)Codec<T>::encode(in[k]));
#pragma unroll
        for (int c = 0; c < WORDS; ++c) {
            reinterpret_cast<uint4*>(r)[c] = make_uint4(w[4 * c], w[4 * c + 1], w[4 * c + 2], w[4 * c + 3]);
        }
    } else {
        Items slow;
#pragma unroll
        for (int k = 0; k < ST_ITEMS; ++k) slow.v[k] = in[k];
        store_items_slow<T>(p, n, slow);
    }
}

__device__ __forceinline__ void load_codes(const unsigned char* p, int n, bool vec, unsigned int (&out)[ST_ITEMS]) {
    if (vec && n == ST_ITEMS) {
        uint2 q = *reinterpret_cast<const uint2*>(p);
#pragma unroll
        for (int k = 0; k < 4; ++k) { out[k] = (q.x >> (8 * k)) & 0xffu; out[k + 4] = (q.y >> (8 * k)) & 0xffu; }
    } else {
#pragma unroll
        for (int k = 0; k < ST_ITEMS; ++k) out[k] = k < n ? p[k] : 0u;
    }
}

__device__ __forceinline__ void store_codes(unsigned char* p, int n, bool vec, const unsigned int (&in)[ST_ITEMS]) {
    if (vec && n == ST_ITEMS) {
        uint2 q;
        q.x = in[0] | (in[1] << 8) | (in[2] << 16) | (in[3] << 24);
        q.y = in[4] | (in[5] << 8) | (in[6] << 16) | (in[7] << 24);
        *reinterpret_cast<uint2*>(p) = q;
    } else {
#pragma unroll
        for (int k = 0; k < ST_ITEMS; ++k) if (k < n) p[k] = (unsigned char)in[k];
    }
}

__device__ __forceinline__ bool aligned16(const void* p) {
    return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0;
}

// ---- tables ------------------------------------------------------------------------------------

template <typename T> __device__ __forceinline__ T* field_ptr(unsigned char* page, const StSegment& s, int f) {
    return s.field[f] < 0 ? nullptr : reinterpret_cast<T*>(page + s.field[f]);
}

template <typename T> __device__ __forceinline__ T* small_ptr(const StTensor& t, int k) {
    return reinterpret_cast<T*>(t.small[k]);
}

// The segment holding tile `tile`: the last one whose tile0 <= tile (tile0 is non-decreasing).
__device__ __forceinline__ int find_segment(const StSegment* segs, int nseg, long long tile) {
    int lo = 0, hi = nseg - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) >> 1;
        if (segs[mid].tile0 <= tile) lo = mid; else hi = mid - 1;
    }
    return lo;
}

__device__ __forceinline__ long long total_tiles(const StSegment* segs, int nseg) {
    if (nseg <= 0) return 0;
    const StSegment& last = segs[nseg - 1];
    return last.tile0 + (last.length + ST_TILE - 1) / ST_TILE;
}

// Calls body(seg, tensor, first) for every tile of the launch that this block owns, where `first`
// is the segment-relative index of the tile's first element. All threads of the block take part.
template <class Body>
__device__ __forceinline__ void for_each_tile(const StSegment* segs, int nseg, const StTensor* tensors, Body body) {
    const long long ntiles = total_tiles(segs, nseg);
    for (long long tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
        const int s = find_segment(segs, nseg, tile);
        const StSegment seg = segs[s];
        const StTensor& t = tensors[seg.tensor];
        body(seg, t, (tile - seg.tile0) * (long long)ST_TILE);
    }
}

// Items this thread owns in a tile that starts at segment element `first`: [e0, e0 + n).
__device__ __forceinline__ int thread_items(const StSegment& seg, long long first, long long& e0) {
    e0 = first + (long long)threadIdx.x * ST_ITEMS;
    long long left = seg.length - e0;
    return left <= 0 ? 0 : (left >= ST_ITEMS ? ST_ITEMS : (int)left);
}

// One thread's items of a page tile, [e0, e0 + n) of the segment (after `start`; n = 0 past its end), with the
// segment's parameter and gradient. Note [theta's home]: with master weights (the page field
// `master_field` present) theta is read from and written to the float master copy and the parameter
// receives it rounded to P; without, theta is the parameter. `vec` is the kernel's to set: whether
// every pointer it moves is 16-byte aligned (load_items).
template <typename P>
struct PageItems {
    P* param;
    const P* grad;
    float* master;  // nullptr without master weights
    long long e0;
    int n;
    bool vec;

    __device__ __forceinline__ PageItems(const StSegment& seg, P* param_arena, const P* grad_arena,
                                         unsigned char* page, int master_field = -1)
        : param(param_arena + seg.param), grad(grad_arena + seg.grad),
          master(master_field < 0 ? nullptr : field_ptr<float>(page, seg, master_field)), e0(0), n(0), vec(false) {}

    // This thread's items of the tile that starts at segment element `first`; returns n.
    __device__ __forceinline__ int start(const StSegment& seg, long long first) { return n = thread_items(seg, first, e0); }

    // Parameter, gradient, the given state fields (nullptr: absent, counts as aligned) and master.
    __device__ __forceinline__ bool aligned_with(const void* a = nullptr, const void* b = nullptr,
                                                 const void* c = nullptr) const {
        return aligned16(param) && aligned16(grad) && aligned16(a) && aligned16(b) && aligned16(c) && aligned16(master);
    }
    template <typename T> __device__ __forceinline__ void load(const T* field, float (&x)[ST_ITEMS]) const {
        load_items(field + e0, n, vec, x);
    }
    template <typename T> __device__ __forceinline__ void store(T* field, const float (&x)[ST_ITEMS]) const {
        store_items(field + e0, n, vec, x);
    }
    __device__ __forceinline__ void load_theta(float (&th)[ST_ITEMS]) const {
        if (master) load(master, th); else load(param, th);
    }
    __device__ __forceinline__ void store_theta(const float (&th)[ST_ITEMS]) const {
        if (master) store(master, th);
        store(param, th);
    }
};

// ---- tensor-list kernels -----------------------------------------------------------------------

// The tensor of this block's row of the launch.
__device__ __forceinline__ const StTensor& list_tensor(const int* ids, const StTensor* tensors) {
    return tensors[ids[blockIdx.y]];
}

// Zeroes a tensor's float64 stats scratch (double[4] in small[slot]) in the step's first kernel.
__device__ __forceinline__ void zero_stats(const StTensor& t, int slot) {
    if (blockIdx.x == 0 && threadIdx.x < 4) small_ptr<double>(t, slot)[threadIdx.x] = 0.0;
}

// Thread 0 of the row's block 0: where the one-thread work of a tensor-list kernel runs.
__device__ __forceinline__ bool first_thread() { return blockIdx.x == 0 && threadIdx.x == 0; }

// Calls body(k) for the k in [0, count) this thread owns in its row of the launch: every thread of
// every block x, then strides of the whole row.
template <class Body> __device__ __forceinline__ void grid_stride(long long count, Body body) {
    for (long long k = (long long)blockIdx.x * ST_THREADS + threadIdx.x; k < count; k += (long long)gridDim.x * ST_THREADS) {
        body(k);
    }
}

// ---- float helpers -----------------------------------------------------------------------------
//
// Note [rounding like the CPU]: NVRTC contracts `a * b + c` into one fused multiply-add unless told
// otherwise, where a CPU module may round the product first. Where a CPU module's order of
// roundings is known, the kernels spell it out: fmaf where the CPU fuses (ATen's `add(a, b, alpha)`
// and lerp are fused multiply-adds), and the rn_* operations, which are never contracted, where it
// rounds each operation. round_to<S> rounds an intermediate to the state type where the CPU module
// computes in that type (16-bit state without master weights); for float it changes nothing.

__device__ __forceinline__ float rn_mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float rn_add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float rn_sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ float rn_div(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ float rn_sqrt(float a) { return __fsqrt_rn(a); }

template <typename S> __device__ __forceinline__ float round_to(float x) { return to_float(from_float<S>(x)); }

// A gradient value as every kernel sees it (Note [gradient multiplier]).
__device__ __forceinline__ float grad_value(float raw, const StTensor& t, bool maximize) {
    const float g = rn_mul(raw, t.hp[ST_GRAD_SCALE]);
    return maximize ? -g : g;
}

template <typename P>
__device__ __forceinline__ float grad_at(const P* g, long long i, const StTensor& t, bool maximize) {
    return grad_value(to_float(g[i]), t, maximize);
}

// torch.maximum: NaN if either input is NaN.
__device__ __forceinline__ float nan_max(float a, float b) {
    return (a != a || b != b) ? __int_as_float(0x7fffffff) : fmaxf(a, b);
}

// torch.clamp(x, min=lo): keeps NaN.
__device__ __forceinline__ float clamp_min(float x, float lo) { return x < lo ? lo : x; }

// ATen's lerp(a, b, w): a + w (b - a) when |w| < 0.5, else b - (b - a)(1 - w), written with one
// fused multiply-add each as the vectorized CPU kernel does.
__device__ __forceinline__ float lerp_aten(float a, float b, float w) {
    return fabsf(w) < 0.5f ? fmaf(w, rn_sub(b, a), a) : fmaf(w - 1.0f, rn_sub(b, a), b);
}

// torch.rsqrt on CPU is 1/sqrt (both correctly rounded); rsqrtf would differ by up to 2 ulp.
__device__ __forceinline__ float rsqrt_exact(float x) { return rn_div(1.0f, rn_sqrt(x)); }

// ---- reductions --------------------------------------------------------------------------------

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

// Reduces over the block with the warp reduction `Warp`: each warp reduces, its lane 0 leaves the
// result in `scratch` (ST_WARPS values), and every warp reduces those, `empty` standing for the
// missing ones. The result is valid in every thread; `scratch` may be reused after the call returns
// (the trailing barrier protects it).
template <typename T, T (*Warp)(T)>
__device__ __forceinline__ T block_reduce(T x, T* scratch, T empty) {
    x = Warp(x);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    T total = lane < ST_WARPS ? scratch[lane] : empty;
    total = Warp(total);
    __syncthreads();
    return total;
}

__device__ __forceinline__ float block_sum(float x, float* scratch) {
    return block_reduce<float, warp_sum>(x, scratch, 0.0f);
}

// Of non-negative values (absmax): 0 stands for the missing warps.
__device__ __forceinline__ float block_max(float x, float* scratch) {
    return block_reduce<float, warp_max>(x, scratch, 0.0f);
}

// Indices of tensor element e of a factored tensor (Adafactor, CAME): row q = l * n + i, column slot l * m + j.
struct Walk {
    long long q, j, i, l;
    static __device__ __forceinline__ Walk at(const StTensor& t, long long e) {
        Walk w;
        w.start(t, e);
        return w;
    }
    __device__ __forceinline__ void start(const StTensor& t, long long e) {
        q = e / t.cols; j = e - q * t.cols; l = q / t.rows; i = q - l * t.rows;
    }
    __device__ __forceinline__ long long col(const StTensor& t) const { return l * t.cols + j; }
    __device__ __forceinline__ void next(const StTensor& t) {
        if (++j == t.cols) { j = 0; ++q; if (++i == t.rows) { i = 0; ++l; } }
    }
};

// Sums over the middle axis of a tensor viewed as [outer, mid, inner]:
// done(o * inner + k, sum over b of load(o * mid * inner + b * inner + k)).
// inner == 1 (a row of contiguous values): one warp per row, lanes stride along it.
// inner > 1 (a column): 32 columns per block, its 8 warps split the mid axis, then combine in
// shared memory. Deterministic: no atomics. Every thread of the block must call it.
template <class Load, class Done>
__device__ __forceinline__ void reduce_mid(long long outer, long long mid, long long inner, Load load, Done done) {
    __shared__ float part[ST_WARPS][33];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (inner == 1) {
        for (long long q = (long long)blockIdx.x * ST_WARPS + warp; q < outer; q += (long long)gridDim.x * ST_WARPS) {
            float s = 0.0f;
            for (long long b = lane; b < mid; b += 32) s += load(q * mid + b);
            s = warp_sum(s);
            if (lane == 0) done(q, s);
        }
        return;
    }
    const long long chunks_per_outer = (inner + 31) / 32;
    const long long chunks = outer * chunks_per_outer;
    for (long long c = blockIdx.x; c < chunks; c += gridDim.x) {
        const long long o = c / chunks_per_outer;
        const long long k = (c - o * chunks_per_outer) * 32 + lane;
        float s = 0.0f;
        if (k < inner) {
            const long long base = o * mid * inner + k;
            for (long long b = warp; b < mid; b += ST_WARPS) s += load(base + b * inner);
        }
        part[warp][lane] = s;
        __syncthreads();
        if (warp == 0) {
            float total = 0.0f;
#pragma unroll
            for (int w = 0; w < ST_WARPS; ++w) total += part[w][lane];
            if (k < inner) done(o * inner + k, total);
        }
        __syncthreads();
    }
}

// The row (ROWS) or column statistic of a factored tensor (kind 1; Adafactor and CAME keep it in
// small[0], [L, n], and small[1], [L, m]): stat <- Stat::update(t, stat, sum, count), the sum over
// the row's m (the column's n) elements of Stat::square(t, g), count = m (n). Other tensors: nothing.
template <bool ROWS, typename S, class Stat, typename P>
__device__ __forceinline__ void factored_stat(const StTensor& t, const P* grad_arena) {
    if (t.kind != 1) return;
    const P* g = grad_arena + t.grad;
    S* stat = small_ptr<S>(t, ROWS ? 0 : 1);
    const float count = (float)(ROWS ? t.cols : t.rows);
    reduce_mid(ROWS ? t.lead * t.rows : t.lead, ROWS ? t.cols : t.rows, ROWS ? 1 : t.cols,
               [&](long long i) { return Stat::square(t, grad_at(g, i, t, false)); },
               [&](long long k, float sum) { stat[k] = from_float<S>(Stat::update(t, to_float(stat[k]), sum, count)); });
}

// done(l, mean over i of row[l * n + i]) for each l < L of a factored tensor's [L, n] row statistic,
// one block per l, called by thread 0. Every thread of the block must call it.
template <typename S, class Done>
__device__ __forceinline__ void row_means(const StTensor& t, const S* row, float* scratch, Done done) {
    for (long long l = blockIdx.x; l < t.lead; l += gridDim.x) {
        float s = 0.0f;
        for (long long i = threadIdx.x; i < t.rows; i += ST_THREADS) s += to_float(row[l * t.rows + i]);
        s = block_sum(s, scratch);
        if (threadIdx.x == 0) done(l, rn_div(s, (float)t.rows));
    }
}

__device__ __forceinline__ double warp_sum(double x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// Sum over the block in float64, valid in every thread; `scratch` holds ST_WARPS doubles.
__device__ __forceinline__ double block_sum(double x, double* scratch) {
    return block_reduce<double, warp_sum>(x, scratch, 0.0);
}

// Adds a block's float64 partial sum into a per-tensor float64 accumulator (one atomic per block).
// The order of the atomics varies from run to run; the sums are rounded to float32 before use, so
// that shows only where a sum lies within 1e-16 (relative) of a float32 rounding boundary.
__device__ __forceinline__ void block_accumulate(double partial, double* target, double* scratch) {
    const double total = block_sum(partial, scratch);
    if (threadIdx.x == 0) atomicAdd(target, total);
}

// Page pass 0 of an unfactored tensor of Adafactor or CAME: the paged second moment, v <- step(g, v)
// for each of this thread's items (the raw gradient value; step returns the item's U), and the
// block's float64 sum of U^2 added to *norm_u. Every thread of the block must call it.
template <typename S, typename P, class Step>
__device__ __forceinline__ void paged_moment(PageItems<P> it, S* moment, double* norm_u, double* scratch, Step step) {
    it.vec = aligned16(it.grad) && aligned16(moment);
    float g[ST_ITEMS], v[ST_ITEMS];
    it.load(it.grad, g);
    it.load(moment, v);
    double sum_u = 0.0;
#pragma unroll
    for (int k = 0; k < ST_ITEMS; ++k) {
        if (k < it.n) {
            const double u = step(g[k], v[k]);
            sum_u += u * u;
        }
    }
    it.store(moment, v);
    block_accumulate(sum_u, norm_u, scratch);
}

}  // namespace stated
