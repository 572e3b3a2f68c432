// Adafactor (stated_kernels/adafactor.py; ALGORITHMS.md section 4.1), following torch.optim.Adafactor.
//
// Per tensor with a gradient (g negated first with MAXIMIZE), w = t^beta2_decay, all stats fp32:
//   alpha = max(eps2, ||theta|| / sqrt(numel)) * rho         rho = min(lr, 1/sqrt(t)); before the decay
//   factored (ndim >= 2, shape (..., n, m), L = numel / (n m)):
//     R[l,i] <- lerp(R[l,i], ||g[l,i,:]||^2 / m, w)          C[l,j] <- lerp(C[l,j], ||g[l,:,j]||^2 / n, w)
//     Vhat[l,i,j] = R[l,i] * C[l,j] / max(mean_i R[l,i], eps1)
//   otherwise: V <- lerp(V, g * g, w), Vhat = V
//   U = g / sqrt(max(Vhat, eps1^2))
//   theta <- theta * (1 - lr * lambda)                        if lambda != 0
//   theta <- theta + scale * U      scale = -alpha / max(1, ||U|| / (sqrt(numel) d))   (float64, rounded once)
//
// The whole second-moment state is per-tensor resident state (not paged), so everything but the
// last two lines happens in the pre-pass; the page pass is one elementwise kernel.
//
// Launch order for one step of one group (ids = the group's tensors with a gradient; tensor-list
// kernels use grid (x, nids), blocks of 256 threads, any x):
//   stated_adafactor_rows       factored: R update (one warp per row)
//   stated_adafactor_cols       factored: C update (32 columns per block)
//   stated_adafactor_row_mean   zeroes the stats; factored: rmean[l] = max(mean_i R[l,i], eps1)
//   stated_adafactor_norms      non-factored: V update; stats[0] += ||theta||^2, stats[1] += ||U||^2
//   stated_adafactor_finish     stats[2] = scale (one thread per tensor; grid (1, nids))
//   stated_adafactor_page       page pass: theta update
//
// Tensor table row: kind 1 factored (rows = n, cols = m, lead = L), kind 0 not.
//   small: 0 row_var (S, L*n) or variance (S, numel)   1 col_var (S, L*m)
//          2 rmean scratch (float, L)                   3 stats scratch (double[4])
//   hp: 0 w = fl32(t^beta2_decay)   1 fl32(eps1)   2 fl32(eps1 * eps1)   3 decay fl32(1 - lr * lambda)
//       4 fl32(lambda)              5 rho          6 eps2                 7 d
// Page kernel: stated_adafactor_page<P, S>(segs, nseg, tensors, param_arena, grad_arena, page, flags)
//   flags: ST_MAXIMIZE. fields: 0 master weights (float, optional).

#include "stated_common.cuh"

using namespace stated;

namespace {

__device__ __forceinline__ float clamp_min(float x, float lo) { return x < lo ? lo : x; }  // keeps NaN

template <typename P>
__device__ __forceinline__ float grad_at(const P* g, long long i, bool maximize) {
    const float x = to_float(g[i]);
    return maximize ? -x : x;
}

// U at tensor element e for a factored tensor.
template <typename S>
__device__ __forceinline__ float factored_u(const StTensor& t, float g, long long q, long long col, long long l) {
    const S* row_var = small_ptr<const S>(t, 0);
    const S* col_var = small_ptr<const S>(t, 1);
    const float* rmean = small_ptr<const float>(t, 2);
    const float vhat = (to_float(row_var[q]) * to_float(col_var[col])) / rmean[l];
    return g * rsqrt_exact(clamp_min(vhat, t.hp[2]));
}

}  // namespace

template <typename P, typename S>
__global__ void __launch_bounds__(ST_THREADS)
stated_adafactor_rows(const int* __restrict__ ids, int nids, const StTensor* __restrict__ tensors,
                      const P* __restrict__ param_arena, const P* __restrict__ grad_arena, unsigned flags) {
    const StTensor& t = tensors[ids[blockIdx.y]];
    if (t.kind != 1) return;
    const P* g = grad_arena + t.grad;
    S* row_var = small_ptr<S>(t, 0);
    const float w = t.hp[0], m = (float)t.cols;
    reduce_mid(t.lead * t.rows, t.cols, 1,
               [&](long long i) { const float x = to_float(g[i]); return x * x; },
               [&](long long q, float sum) {
                   const float norm = sqrtf(sum);
                   row_var[q] = from_float<S>(lerp_aten(to_float(row_var[q]), (norm * norm) / m, w));
               });
}

template <typename P, typename S>
__global__ void __launch_bounds__(ST_THREADS)
stated_adafactor_cols(const int* __restrict__ ids, int nids, const StTensor* __restrict__ tensors,
                      const P* __restrict__ param_arena, const P* __restrict__ grad_arena, unsigned flags) {
    const StTensor& t = tensors[ids[blockIdx.y]];
    if (t.kind != 1) return;
    const P* g = grad_arena + t.grad;
    S* col_var = small_ptr<S>(t, 1);
    const float w = t.hp[0], n = (float)t.rows;
    reduce_mid(t.lead, t.rows, t.cols,
               [&](long long i) { const float x = to_float(g[i]); return x * x; },
               [&](long long c, float sum) {
                   const float norm = sqrtf(sum);
                   col_var[c] = from_float<S>(lerp_aten(to_float(col_var[c]), (norm * norm) / n, w));
               });
}

template <typename P, typename S>
__global__ void __launch_bounds__(ST_THREADS)
stated_adafactor_row_mean(const int* __restrict__ ids, int nids, const StTensor* __restrict__ tensors,
                          const P* __restrict__ param_arena, const P* __restrict__ grad_arena, unsigned flags) {
    __shared__ float scratch[ST_WARPS];
    const StTensor& t = tensors[ids[blockIdx.y]];
    if (blockIdx.x == 0 && threadIdx.x < 4) small_ptr<double>(t, 3)[threadIdx.x] = 0.0;
    if (t.kind != 1) return;
    const S* row_var = small_ptr<const S>(t, 0);
    float* rmean = small_ptr<float>(t, 2);
    for (long long l = blockIdx.x; l < t.lead; l += gridDim.x) {
        float s = 0.0f;
        for (long long i = threadIdx.x; i < t.rows; i += ST_THREADS) s += to_float(row_var[l * t.rows + i]);
        s = block_sum(s, scratch);
        if (threadIdx.x == 0) rmean[l] = clamp_min(s / (float)t.rows, t.hp[1]);
    }
}

template <typename P, typename S>
__global__ void __launch_bounds__(ST_THREADS)
stated_adafactor_norms(const int* __restrict__ ids, int nids, const StTensor* __restrict__ tensors,
                       const P* __restrict__ param_arena, const P* __restrict__ grad_arena, unsigned flags) {
    __shared__ float scratch[ST_WARPS];
    const StTensor& t = tensors[ids[blockIdx.y]];
    const bool maximize = flags & ST_MAXIMIZE;
    const P* th = param_arena + t.param;
    const P* g = grad_arena + t.grad;
    double* stats = small_ptr<double>(t, 3);
    const long long stride = (long long)gridDim.x * ST_THREADS;
    float sum_theta = 0.0f, sum_u = 0.0f;
    for (long long e = (long long)blockIdx.x * ST_THREADS + threadIdx.x; e < t.numel; e += stride) {
        const float p = to_float(th[e]);
        sum_theta += p * p;
        const float gk = grad_at(g, e, maximize);
        float u;
        if (t.kind == 1) {
            const long long q = e / t.cols, j = e - q * t.cols, l = q / t.rows;
            u = factored_u<S>(t, gk, q, l * t.cols + j, l);
        } else {
            S* variance = small_ptr<S>(t, 0);
            const float v = to_float(from_float<S>(lerp_aten(to_float(variance[e]), gk * gk, t.hp[0])));
            variance[e] = from_float<S>(v);
            u = gk * rsqrt_exact(clamp_min(v, t.hp[2]));
        }
        sum_u += u * u;
    }
    // Every block of the tensor's row reaches both reductions (no early exit above).
    block_accumulate(sum_theta, &stats[0], scratch);
    block_accumulate(sum_u, &stats[1], scratch);
}

template <typename P, typename S>
__global__ void stated_adafactor_finish(const int* __restrict__ ids, int nids, const StTensor* __restrict__ tensors,
                                        const P* __restrict__ param_arena, const P* __restrict__ grad_arena,
                                        unsigned flags) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    const StTensor& t = tensors[ids[blockIdx.y]];
    double* stats = small_ptr<double>(t, 3);
    const double root_numel = sqrt((double)t.numel);
    const double rms = (double)sqrtf((float)stats[0]) / root_numel;
    const double alpha = fmax((double)t.hp[6], rms) * (double)t.hp[5];
    const double denom = fmax(1.0, (double)sqrtf((float)stats[1]) / (root_numel * (double)t.hp[7]));
    stats[2] = -alpha / denom;
}

template <typename P, typename S>
__global__ void __launch_bounds__(ST_THREADS)
stated_adafactor_page(const StSegment* __restrict__ segs, int nseg, const StTensor* __restrict__ tensors,
                      P* __restrict__ param_arena, const P* __restrict__ grad_arena, unsigned char* __restrict__ page,
                      unsigned flags) {
    const bool maximize = flags & ST_MAXIMIZE;
    for_each_tile(segs, nseg, tensors, [&](const StSegment& seg, const StTensor& t, long long first) {
        P* param = param_arena + seg.param;
        const P* grad = grad_arena + seg.grad;
        float* master = field_ptr<float>(page, seg, 0);
        const bool vec = aligned16(param) && aligned16(grad) && aligned16(master);
        long long e0;
        const int n = thread_items(seg, first, e0);
        if (n == 0) return;
        const float scale = (float)small_ptr<const double>(t, 3)[2];
        const bool decay = t.hp[4] != 0.0f;

        float g[ST_ITEMS], th[ST_ITEMS];
        load_items(grad + e0, n, vec, g);
        if (master) load_items(master + e0, n, vec, th); else load_items(param + e0, n, vec, th);

        const long long e = seg.start + e0;  // tensor element of item 0
        long long q = 0, j = 0, i = 0, l = 0;
        if (t.kind == 1) { q = e / t.cols; j = e - q * t.cols; l = q / t.rows; i = q - l * t.rows; }
#pragma unroll
        for (int k = 0; k < ST_ITEMS; ++k) {
            if (k < n) {
                const float gk = maximize ? -g[k] : g[k];
                float u;
                if (t.kind == 1) {
                    u = factored_u<S>(t, gk, q, l * t.cols + j, l);
                    if (++j == t.cols) { j = 0; ++q; if (++i == t.rows) { i = 0; ++l; } }
                } else {
                    const float v = to_float(small_ptr<const S>(t, 0)[e + k]);
                    u = gk * rsqrt_exact(clamp_min(v, t.hp[2]));
                }
                if (decay) th[k] = th[k] * t.hp[3];
                th[k] = fmaf(u, scale, th[k]);
            }
        }
        if (master) store_items(master + e0, n, vec, th);
        store_items(param + e0, n, vec, th);
    });
}
