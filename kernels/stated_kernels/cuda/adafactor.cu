// Adafactor (stated_kernels/adafactor.py; ALGORITHMS.md section 4.1), following torch.optim.Adafactor.
//
// Per tensor with a gradient (g <- g * hp[31], then negated with MAXIMIZE), w = t^beta2_decay:
//   alpha = max(eps2, ||theta|| / sqrt(numel)) * rho         rho = min(lr, 1/sqrt(t)); the arena's theta
//   factored (ndim >= 2, shape (..., n, m), L = numel / (n m)), resident:
//     R[l,i] <- lerp(R[l,i], ||g[l,i,:]||^2 / m, w)          C[l,j] <- lerp(C[l,j], ||g[l,:,j]||^2 / n, w)
//     Vhat[l,i,j] = R[l,i] * C[l,j] / max(mean_i R[l,i], eps1)
//   otherwise, paged: V <- lerp(V, g * g, w), Vhat = V
//   U = g / sqrt(max(Vhat, eps1^2))
//   theta <- theta * (1 - lr * lambda)                        if lambda != 0
//   theta <- theta + scale * U      scale = -alpha / max(1, ||U|| / (sqrt(numel) d))   (float64, rounded once)
//
// As in the CPU module, a factored tensor's R, C and ||U|| come from the pre-pass; an unfactored
// tensor's V is paged, so its ||U|| is summed in page pass 0 and its scale formed between passes.
// Pass 1 moves theta. Intermediates the CPU module computes in the state type S are rounded to S
// (Note [rounding like the CPU]).
//
// Launch order for one step (ids = the tensors with a gradient; tensor-list kernels use grid
// (x, nids), blocks of 256 threads, any x; the _finish and _between kernels grid (1, nids)):
//   pre-pass: stated_adafactor_rows       factored: R update (one warp per row)
//             stated_adafactor_cols       factored: C update (32 columns per block)
//             stated_adafactor_row_mean   zeroes the stats; factored: rmean[l] = max(mean_i R[l,i], eps1)
//             stated_adafactor_norms      stats[0] += ||theta||^2; factored: stats[1] += ||U||^2
//             stated_adafactor_finish     stats[3] = alpha; factored: stats[2] = scale
//   pass 0:   stated_adafactor_page0      unfactored: V update, stats[1] += ||U||^2
//   between:  stated_adafactor_between    unfactored: stats[2] = scale
//   pass 1:   stated_adafactor_page1      theta update
//
// Tensor table row: kind 1 factored (rows = n, cols = m, lead = L), kind 0 not.
//   small: 0 row_var (S, L*n)   1 col_var (S, L*m)   2 rmean scratch (float, L)   (factored only)
//          3 stats scratch (double[4]: ||theta||^2, ||U||^2, scale, alpha)
//   hp: 0 w = fl32(t^beta2_decay)   1 fl32(eps1)   2 fl32(eps1 * eps1)   3 decay fl32(1 - lr * lambda)
//       4 fl32(lambda)   5, 6 rho   7, 8 eps2   9, 10 d   (each a float64 as two floats: hi, lo)
//       31 gradient multiplier
//   fields: 0 variance (S, unfactored only)   1 master (float, optional).   flags: ST_MAXIMIZE.

#include "stated_common.cuh"

using namespace stated;

namespace {

__device__ __forceinline__ double hp_double(const StTensor& t, int k) { return (double)t.hp[k] + (double)t.hp[k + 1]; }

// U at row q, column slot col, leading index l of a factored tensor.
template <typename S>
__device__ __forceinline__ float factored_u(const StTensor& t, float g, long long q, long long col, long long l) {
    const S* row_var = small_ptr<const S>(t, 0);
    const S* col_var = small_ptr<const S>(t, 1);
    const float* rmean = small_ptr<const float>(t, 2);
    const float vhat = round_to<S>(rn_div(round_to<S>(rn_mul(to_float(row_var[q]), to_float(col_var[col]))), rmean[l]));
    return round_to<S>(rn_mul(round_to<S>(rsqrt_exact(clamp_min(vhat, t.hp[2]))), g));
}

template <typename S> __device__ __forceinline__ float unfactored_u(const StTensor& t, float g, float v) {
    return round_to<S>(rn_mul(round_to<S>(rsqrt_exact(clamp_min(v, t.hp[2]))), g));
}

// torch.norm(g, dim)^2 / size in S: the norm, its square and the quotient each rounded to S.
template <typename S> __device__ __forceinline__ float mean_square(float sum, float size) {
    const float norm = round_to<S>(rn_sqrt(sum));
    return round_to<S>(rn_div(round_to<S>(rn_mul(norm, norm)), size));
}

// A float64 norm rounded to float, then to S: torch's x.norm(2).item() of an S tensor.
template <typename S> __device__ __forceinline__ double norm_of(double sum_squares) {
    return (double)round_to<S>((float)sqrt(sum_squares));
}

// scale = -alpha / max(1, ||U|| / (sqrt(numel) d)).
__device__ __forceinline__ double step_scale(const StTensor& t, double alpha, double norm_u) {
    return -alpha / fmax(1.0, norm_u / (sqrt((double)t.numel) * hp_double(t, 9)));
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
               [&](long long i) { const float x = round_to<S>(grad_at(g, i, t, false)); return rn_mul(x, x); },
               [&](long long q, float sum) {
                   row_var[q] = from_float<S>(lerp_aten(to_float(row_var[q]), mean_square<S>(sum, m), w));
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
               [&](long long i) { const float x = round_to<S>(grad_at(g, i, t, false)); return rn_mul(x, x); },
               [&](long long c, float sum) {
                   col_var[c] = from_float<S>(lerp_aten(to_float(col_var[c]), mean_square<S>(sum, n), w));
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
        if (threadIdx.x == 0) rmean[l] = round_to<S>(clamp_min(round_to<S>(rn_div(s, (float)t.rows)), t.hp[1]));
    }
}

template <typename P, typename S>
__global__ void __launch_bounds__(ST_THREADS)
stated_adafactor_norms(const int* __restrict__ ids, int nids, const StTensor* __restrict__ tensors,
                       const P* __restrict__ param_arena, const P* __restrict__ grad_arena, unsigned flags) {
    __shared__ double scratch[ST_WARPS];
    const StTensor& t = tensors[ids[blockIdx.y]];
    const P* th = param_arena + t.param;
    const P* g = grad_arena + t.grad;
    double* stats = small_ptr<double>(t, 3);
    const bool factored = t.kind == 1;
    const long long stride = (long long)gridDim.x * ST_THREADS;
    double sum_theta = 0.0, sum_u = 0.0;
    for (long long e = (long long)blockIdx.x * ST_THREADS + threadIdx.x; e < t.numel; e += stride) {
        const double p = round_to<S>(to_float(th[e]));
        sum_theta += p * p;
        if (factored) {
            Walk w;
            w.start(t, e);
            const double u = factored_u<S>(t, round_to<S>(grad_at(g, e, t, false)), w.q, w.col(t), w.l);
            sum_u += u * u;
        }
    }
    // Every block of the tensor's row reaches both reductions (no early exit above).
    block_accumulate(sum_theta, &stats[0], scratch);
    if (factored) block_accumulate(sum_u, &stats[1], scratch);
}

template <typename P, typename S>
__global__ void stated_adafactor_finish(const int* __restrict__ ids, int nids, const StTensor* __restrict__ tensors,
                                        const P* __restrict__ param_arena, const P* __restrict__ grad_arena,
                                        unsigned flags) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    const StTensor& t = tensors[ids[blockIdx.y]];
    double* stats = small_ptr<double>(t, 3);
    const double rms = norm_of<S>(stats[0]) / sqrt((double)t.numel);
    const double alpha = fmax(hp_double(t, 7), rms) * hp_double(t, 5);
    stats[3] = alpha;
    if (t.kind == 1) stats[2] = step_scale(t, alpha, norm_of<S>(stats[1]));
}

template <typename P, typename S>
__global__ void __launch_bounds__(ST_THREADS)
stated_adafactor_page0(const StSegment* __restrict__ segs, int nseg, const StTensor* __restrict__ tensors,
                       P* __restrict__ param_arena, const P* __restrict__ grad_arena, unsigned char* __restrict__ page,
                       unsigned flags) {
    __shared__ double scratch[ST_WARPS];
    const bool maximize = flags & ST_MAXIMIZE;
    for_each_tile(segs, nseg, tensors, [&](const StSegment& seg, const StTensor& t, long long first) {
        if (t.kind == 1) return;  // the whole block leaves: a tile belongs to one tensor
        const P* grad = grad_arena + seg.grad;
        S* variance = field_ptr<S>(page, seg, 0);
        const bool vec = aligned16(grad) && aligned16(variance);
        long long e0;
        const int n = thread_items(seg, first, e0);  // no early return: the block sums below
        float g[ST_ITEMS], v[ST_ITEMS];
        load_items(grad + e0, n, vec, g);
        load_items(variance + e0, n, vec, v);
        double sum_u = 0.0;
#pragma unroll
        for (int k = 0; k < ST_ITEMS; ++k) {
            if (k < n) {
                const float gk = round_to<S>(grad_value(g[k], t, maximize));
                v[k] = round_to<S>(lerp_aten(v[k], round_to<S>(rn_mul(gk, gk)), t.hp[0]));
                const double u = unfactored_u<S>(t, gk, v[k]);
                sum_u += u * u;
            }
        }
        store_items(variance + e0, n, vec, v);
        block_accumulate(sum_u, &small_ptr<double>(t, 3)[1], scratch);
    });
}

template <typename P, typename S>
__global__ void stated_adafactor_between(const int* __restrict__ ids, int nids, const StTensor* __restrict__ tensors,
                                         const P* __restrict__ param_arena, const P* __restrict__ grad_arena,
                                         unsigned flags) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    const StTensor& t = tensors[ids[blockIdx.y]];
    if (t.kind == 1) return;
    double* stats = small_ptr<double>(t, 3);
    stats[2] = step_scale(t, stats[3], sqrt(stats[1]));  // the CPU module's math.sqrt of its float64 fold
}

template <typename P, typename S>
__global__ void __launch_bounds__(ST_THREADS)
stated_adafactor_page1(const StSegment* __restrict__ segs, int nseg, const StTensor* __restrict__ tensors,
                       P* __restrict__ param_arena, const P* __restrict__ grad_arena, unsigned char* __restrict__ page,
                       unsigned flags) {
    const bool maximize = flags & ST_MAXIMIZE;
    for_each_tile(segs, nseg, tensors, [&](const StSegment& seg, const StTensor& t, long long first) {
        const bool factored = t.kind == 1;
        P* param = param_arena + seg.param;
        const P* grad = grad_arena + seg.grad;
        const S* variance = factored ? nullptr : field_ptr<const S>(page, seg, 0);
        float* master = field_ptr<float>(page, seg, 1);
        const bool vec = aligned16(param) && aligned16(grad) && aligned16(variance) && aligned16(master);
        long long e0;
        const int n = thread_items(seg, first, e0);
        if (n == 0) return;
        // ATen rounds add's alpha to a 16-bit tensor's type.
        const float scale = round_to<S>((float)small_ptr<const double>(t, 3)[2]);
        const bool decay = t.hp[4] != 0.0f;

        float g[ST_ITEMS], th[ST_ITEMS], v[ST_ITEMS];
        load_items(grad + e0, n, vec, g);
        if (master) load_items(master + e0, n, vec, th); else load_items(param + e0, n, vec, th);
        if (!factored) load_items(variance + e0, n, vec, v);

        Walk w{0, 0, 0, 0};
        if (factored) w.start(t, seg.start + e0);
#pragma unroll
        for (int k = 0; k < ST_ITEMS; ++k) {
            if (k < n) {
                const float gk = round_to<S>(grad_value(g[k], t, maximize));
                float u;
                if (factored) {
                    u = factored_u<S>(t, gk, w.q, w.col(t), w.l);
                    w.next(t);
                } else {
                    u = unfactored_u<S>(t, gk, v[k]);
                }
                // theta has type S: P without master weights, the float master copy with them.
                if (decay) th[k] = round_to<S>(rn_mul(th[k], t.hp[3]));
                th[k] = fmaf(u, scale, th[k]);
            }
        }
        if (master) store_items(master + e0, n, vec, th);
        store_items(param + e0, n, vec, th);
    });
}
