// CAME (stated_kernels/came.py; ALGORITHMS.md section 5), following came-pytorch 0.1.3.
//
// Per tensor with a gradient, u = g * g + eps1, every EMA written `x * beta + (1 - beta) * new`:
//   factored (ndim >= 2, shape (..., n, m)):
//     R <- EMA_beta2(R, mean_j u)    C <- EMA_beta2(C, mean_i u)
//     U = (rsqrt(R[l,i] / mean_i R[l,:]) * rsqrt(C[l,j])) * g
//   otherwise: V <- EMA_beta2(V, u), U = rsqrt(V) * g
//   U <- U / max(||U|| / sqrt(numel) / clip_threshold, 1)
//   M <- EMA_beta1(M, U)                                  (M = exp_avg, paged)
//   factored: res = (U - M)^2 + eps2;  SR <- EMA_beta3(SR, mean_j res);  SC <- EMA_beta3(SC, mean_i res)
//             update = (rsqrt(SR[l,i] / mean_i SR[l,:]) * rsqrt(SC[l,j])) * M
//   otherwise: update = M
//   theta <- theta + (-lambda * lr) * theta               if lambda != 0
//   theta <- theta - update * lr
//
// SR and SC need the new M of the whole tensor, so CAME takes two page passes (Algorithm.passes = 2).
// Launch order for one step of one group (tensor-list kernels: grid (x, nids), 256 threads):
//   pre-pass:  stated_came_rows, stated_came_cols        factored: R, C updates
//              stated_came_row_mean                      zeroes stats and res sums; factored: mean_i R
//              stated_came_norms                         non-factored: V update; stats[0] = ||U||^2
//              stated_came_finish (grid (1, nids))       stats[1] = max(||U|| / sqrt(numel) / clip, 1)
//   pass 0:    stated_came_page0                         M update; res row/column sums (atomics);
//                                                        non-factored tensors finish their step here
//   between:   stated_came_between                       SR, SC updates
//              stated_came_between_mean                  mean_i SR
//   pass 1:    stated_came_page1                         factored tensors: theta update
//
// Tensor table row: kind 1 factored (rows = n, cols = m, lead = L), kind 0 not.
//   small: 0 exp_avg_sq_row (S, L*n) or exp_avg_sq (S, numel)   1 exp_avg_sq_col (S, L*m)
//          2 exp_avg_res_row (S, L*n)   3 exp_avg_res_col (S, L*m)
//          4 means scratch (float, 2L: mean_i R then mean_i SR)
//          5 res sums scratch (float, L*n + L*m)   6 stats scratch (double[4])
//   hp: 0 beta1  1 fl32(1 - beta1)  2 beta2  3 fl32(1 - beta2)  4 beta3  5 fl32(1 - beta3)
//       6 eps1   7 eps2             8 clip_threshold           9 lr   10 fl32(-lambda * lr)  11 lambda
// Page kernels: (segs, nseg, tensors, param_arena, grad_arena, page, flags)
//   fields: 0 exp_avg (S)  1 master weights (float, optional).  flags: ST_MAXIMIZE.

#include "stated_common.cuh"

using namespace stated;

namespace {

template <typename S> __device__ __forceinline__ float round_to(float x) { return to_float(from_float<S>(x)); }

template <typename P>
__device__ __forceinline__ float grad_at(const P* g, long long i, bool maximize) {
    const float x = to_float(g[i]);
    return maximize ? -x : x;
}

// Elementwise U before clipping (factored: from R, C and mean_i R; otherwise from V).
template <typename S>
__device__ __forceinline__ float came_u(const StTensor& t, float g, long long e, long long q, long long col, long long l) {
    if (t.kind == 1) {
        const float r = to_float(small_ptr<const S>(t, 0)[q]) / small_ptr<const float>(t, 4)[l];
        const float c = to_float(small_ptr<const S>(t, 1)[col]);
        return (rsqrt_exact(r) * rsqrt_exact(c)) * g;
    }
    return rsqrt_exact(to_float(small_ptr<const S>(t, 0)[e])) * g;
}

// Indices of tensor element e: row q = l * n + i, column slot l * m + j.
struct Walk {
    long long q, j, i, l;
    __device__ __forceinline__ void start(const StTensor& t, long long e) {
        q = e / t.cols; j = e - q * t.cols; l = q / t.rows; i = q - l * t.rows;
    }
    __device__ __forceinline__ long long col(const StTensor& t) const { return l * t.cols + j; }
    __device__ __forceinline__ void next(const StTensor& t) {
        if (++j == t.cols) { j = 0; ++q; if (++i == t.rows) { i = 0; ++l; } }
    }
};

}  // namespace

template <typename P, typename S>
__global__ void __launch_bounds__(ST_THREADS)
stated_came_rows(const int* __restrict__ ids, int nids, const StTensor* __restrict__ tensors,
                 const P* __restrict__ param_arena, const P* __restrict__ grad_arena, unsigned flags) {
    const StTensor& t = tensors[ids[blockIdx.y]];
    if (t.kind != 1) return;
    const P* g = grad_arena + t.grad;
    S* row = small_ptr<S>(t, 0);
    const float beta2 = t.hp[2], c2 = t.hp[3], eps1 = t.hp[6], m = (float)t.cols;
    reduce_mid(t.lead * t.rows, t.cols, 1,
               [&](long long i) { const float x = to_float(g[i]); return x * x + eps1; },
               [&](long long q, float sum) { row[q] = from_float<S>(fmaf(sum / m, c2, to_float(row[q]) * beta2)); });
}

template <typename P, typename S>
__global__ void __launch_bounds__(ST_THREADS)
stated_came_cols(const int* __restrict__ ids, int nids, const StTensor* __restrict__ tensors,
                 const P* __restrict__ param_arena, const P* __restrict__ grad_arena, unsigned flags) {
    const StTensor& t = tensors[ids[blockIdx.y]];
    if (t.kind != 1) return;
    const P* g = grad_arena + t.grad;
    S* col = small_ptr<S>(t, 1);
    const float beta2 = t.hp[2], c2 = t.hp[3], eps1 = t.hp[6], n = (float)t.rows;
    reduce_mid(t.lead, t.rows, t.cols,
               [&](long long i) { const float x = to_float(g[i]); return x * x + eps1; },
               [&](long long c, float sum) { col[c] = from_float<S>(fmaf(sum / n, c2, to_float(col[c]) * beta2)); });
}

// Mean over i of a [L, n] row statistic into out[l] (one block per l).
template <typename S>
__device__ __forceinline__ void row_means(const StTensor& t, const S* row, float* out, float* scratch) {
    for (long long l = blockIdx.x; l < t.lead; l += gridDim.x) {
        float s = 0.0f;
        for (long long i = threadIdx.x; i < t.rows; i += ST_THREADS) s += to_float(row[l * t.rows + i]);
        s = block_sum(s, scratch);
        if (threadIdx.x == 0) out[l] = s / (float)t.rows;
    }
}

template <typename P, typename S>
__global__ void __launch_bounds__(ST_THREADS)
stated_came_row_mean(const int* __restrict__ ids, int nids, const StTensor* __restrict__ tensors,
                     const P* __restrict__ param_arena, const P* __restrict__ grad_arena, unsigned flags) {
    __shared__ float scratch[ST_WARPS];
    const StTensor& t = tensors[ids[blockIdx.y]];
    if (blockIdx.x == 0 && threadIdx.x < 4) small_ptr<double>(t, 6)[threadIdx.x] = 0.0;
    if (t.kind != 1) return;
    float* sums = small_ptr<float>(t, 5);
    const long long nsums = t.lead * (t.rows + t.cols);
    for (long long k = (long long)blockIdx.x * ST_THREADS + threadIdx.x; k < nsums; k += (long long)gridDim.x * ST_THREADS) {
        sums[k] = 0.0f;
    }
    row_means(t, small_ptr<const S>(t, 0), small_ptr<float>(t, 4), scratch);
}

template <typename P, typename S>
__global__ void __launch_bounds__(ST_THREADS)
stated_came_norms(const int* __restrict__ ids, int nids, const StTensor* __restrict__ tensors,
                  const P* __restrict__ param_arena, const P* __restrict__ grad_arena, unsigned flags) {
    __shared__ float scratch[ST_WARPS];
    const StTensor& t = tensors[ids[blockIdx.y]];
    const bool maximize = flags & ST_MAXIMIZE;
    const P* g = grad_arena + t.grad;
    const long long stride = (long long)gridDim.x * ST_THREADS;
    float sum_u = 0.0f;
    for (long long e = (long long)blockIdx.x * ST_THREADS + threadIdx.x; e < t.numel; e += stride) {
        const float gk = grad_at(g, e, maximize);
        float u;
        if (t.kind == 1) {
            Walk w;
            w.start(t, e);
            u = came_u<S>(t, gk, e, w.q, w.col(t), w.l);
        } else {
            S* v = small_ptr<S>(t, 0);
            const float nv = round_to<S>(fmaf(gk * gk + t.hp[6], t.hp[3], to_float(v[e]) * t.hp[2]));
            v[e] = from_float<S>(nv);
            u = rsqrt_exact(nv) * gk;
        }
        sum_u += u * u;
    }
    block_accumulate(sum_u, &small_ptr<double>(t, 6)[0], scratch);
}

template <typename P, typename S>
__global__ void stated_came_finish(const int* __restrict__ ids, int nids, const StTensor* __restrict__ tensors,
                                   const P* __restrict__ param_arena, const P* __restrict__ grad_arena, unsigned flags) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    const StTensor& t = tensors[ids[blockIdx.y]];
    double* stats = small_ptr<double>(t, 6);
    // torch: (update.norm(2) / numel ** 0.5 / clip_threshold).clamp_(min=1.0), in float32.
    const float rms = sqrtf((float)stats[0]) / (float)sqrt((double)t.numel);
    stats[1] = (double)fmaxf(rms / t.hp[8], 1.0f);
}

template <typename P, typename S>
__global__ void __launch_bounds__(ST_THREADS)
stated_came_page0(const StSegment* __restrict__ segs, int nseg, const StTensor* __restrict__ tensors,
                  P* __restrict__ param_arena, const P* __restrict__ grad_arena, unsigned char* __restrict__ page,
                  unsigned flags) {
    const bool maximize = flags & ST_MAXIMIZE;
    for_each_tile(segs, nseg, tensors, [&](const StSegment& seg, const StTensor& t, long long first) {
        P* param = param_arena + seg.param;
        const P* grad = grad_arena + seg.grad;
        S* exp_avg = field_ptr<S>(page, seg, 0);
        float* master = field_ptr<float>(page, seg, 1);
        const bool vec = aligned16(param) && aligned16(grad) && aligned16(exp_avg) && aligned16(master);
        long long e0;
        const int n = thread_items(seg, first, e0);
        if (n == 0) return;
        const bool factored = t.kind == 1;
        const float clip_div = (float)small_ptr<const double>(t, 6)[1];
        const float beta1 = t.hp[0], c1 = t.hp[1], eps2 = t.hp[7];

        float g[ST_ITEMS], m[ST_ITEMS];
        load_items(grad + e0, n, vec, g);
        load_items(exp_avg + e0, n, vec, m);
        const long long e = seg.start + e0;
        Walk w{0, 0, 0, 0};
        if (factored) w.start(t, e);
        float* row_sums = factored ? small_ptr<float>(t, 5) : nullptr;
        float* col_sums = factored ? row_sums + t.lead * t.rows : nullptr;
        float run = 0.0f;
        long long run_row = w.q;
#pragma unroll
        for (int k = 0; k < ST_ITEMS; ++k) {
            if (k < n) {
                const float gk = maximize ? -g[k] : g[k];
                const float u = came_u<S>(t, gk, e + k, w.q, w.col(t), w.l) / clip_div;
                m[k] = round_to<S>(fmaf(u, c1, m[k] * beta1));
                if (factored) {
                    const float d = u - m[k];
                    const float res = d * d + eps2;
                    if (w.q != run_row) { atomicAdd(&row_sums[run_row], run); run = 0.0f; run_row = w.q; }
                    run += res;
                    atomicAdd(&col_sums[w.col(t)], res);
                    w.next(t);
                }
            }
        }
        if (factored) atomicAdd(&row_sums[run_row], run);
        store_items(exp_avg + e0, n, vec, m);
        if (factored) return;

        // Not factored: update = M, the step ends here.
        float th[ST_ITEMS];
        if (master) load_items(master + e0, n, vec, th); else load_items(param + e0, n, vec, th);
        const float lr = t.hp[9], neg_wd_lr = t.hp[10];
        const bool decay = t.hp[11] != 0.0f;
#pragma unroll
        for (int k = 0; k < ST_ITEMS; ++k) {
            if (decay) th[k] = fmaf(th[k], neg_wd_lr, th[k]);
            th[k] = th[k] - m[k] * lr;
        }
        if (master) store_items(master + e0, n, vec, th);
        store_items(param + e0, n, vec, th);
    });
}

template <typename P, typename S>
__global__ void __launch_bounds__(ST_THREADS)
stated_came_between(const int* __restrict__ ids, int nids, const StTensor* __restrict__ tensors,
                    const P* __restrict__ param_arena, const P* __restrict__ grad_arena, unsigned flags) {
    const StTensor& t = tensors[ids[blockIdx.y]];
    if (t.kind != 1) return;
    S* res_row = small_ptr<S>(t, 2);
    S* res_col = small_ptr<S>(t, 3);
    const float* sums = small_ptr<const float>(t, 5);
    const float beta3 = t.hp[4], c3 = t.hp[5];
    const long long nrows = t.lead * t.rows, total = nrows + t.lead * t.cols;
    for (long long k = (long long)blockIdx.x * ST_THREADS + threadIdx.x; k < total; k += (long long)gridDim.x * ST_THREADS) {
        if (k < nrows) {
            res_row[k] = from_float<S>(fmaf(sums[k] / (float)t.cols, c3, to_float(res_row[k]) * beta3));
        } else {
            const long long c = k - nrows;
            res_col[c] = from_float<S>(fmaf(sums[k] / (float)t.rows, c3, to_float(res_col[c]) * beta3));
        }
    }
}

template <typename P, typename S>
__global__ void __launch_bounds__(ST_THREADS)
stated_came_between_mean(const int* __restrict__ ids, int nids, const StTensor* __restrict__ tensors,
                         const P* __restrict__ param_arena, const P* __restrict__ grad_arena, unsigned flags) {
    __shared__ float scratch[ST_WARPS];
    const StTensor& t = tensors[ids[blockIdx.y]];
    if (t.kind != 1) return;
    row_means(t, small_ptr<const S>(t, 2), small_ptr<float>(t, 4) + t.lead, scratch);
}

template <typename P, typename S>
__global__ void __launch_bounds__(ST_THREADS)
stated_came_page1(const StSegment* __restrict__ segs, int nseg, const StTensor* __restrict__ tensors,
                  P* __restrict__ param_arena, const P* __restrict__ grad_arena, unsigned char* __restrict__ page,
                  unsigned flags) {
    for_each_tile(segs, nseg, tensors, [&](const StSegment& seg, const StTensor& t, long long first) {
        if (t.kind != 1) return;  // non-factored tensors finished in pass 0
        P* param = param_arena + seg.param;
        S* exp_avg = field_ptr<S>(page, seg, 0);
        float* master = field_ptr<float>(page, seg, 1);
        const bool vec = aligned16(param) && aligned16(exp_avg) && aligned16(master);
        long long e0;
        const int n = thread_items(seg, first, e0);
        if (n == 0) return;
        const S* res_row = small_ptr<const S>(t, 2);
        const S* res_col = small_ptr<const S>(t, 3);
        const float* res_mean = small_ptr<const float>(t, 4) + t.lead;
        const float lr = t.hp[9], neg_wd_lr = t.hp[10];
        const bool decay = t.hp[11] != 0.0f;

        float m[ST_ITEMS], th[ST_ITEMS];
        load_items(exp_avg + e0, n, vec, m);
        if (master) load_items(master + e0, n, vec, th); else load_items(param + e0, n, vec, th);
        Walk w;
        w.start(t, seg.start + e0);
#pragma unroll
        for (int k = 0; k < ST_ITEMS; ++k) {
            if (k < n) {
                const float r = rsqrt_exact(to_float(res_row[w.q]) / res_mean[w.l]);
                const float c = rsqrt_exact(to_float(res_col[w.col(t)]));
                const float update = (r * c) * m[k];
                if (decay) th[k] = fmaf(th[k], neg_wd_lr, th[k]);
                th[k] = th[k] - update * lr;
                w.next(t);
            }
        }
        if (master) store_items(master + e0, n, vec, th);
        store_items(param + e0, n, vec, th);
    });
}
