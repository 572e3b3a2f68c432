// CAME (stated_kernels/came.py; ALGORITHMS.md section 5), following came-pytorch 0.1.3.
//
// Per tensor with a gradient (g <- g * hp[31]; no maximize), u = g * g + eps1, every EMA written
// `x * beta + (1 - beta) * new` as ATen's fma(new, 1 - beta, round(x * beta)):
//   factored (ndim >= 2, shape (..., n, m)), resident:
//     R <- EMA_beta2(R, mean_j u)    C <- EMA_beta2(C, mean_i u)
//     U = (rsqrt(R[l,i] / mean_i R[l,:]) * rsqrt(C[l,j])) * g
//   otherwise, paged: V <- EMA_beta2(V, u), U = rsqrt(V) * g
//   U <- U / max(||U|| / sqrt(numel) / clip_threshold, 1)
//   M <- EMA_beta1(M, U)                                  (M = exp_avg, paged)
//   factored: res = (U - M)^2 + eps2;  SR <- EMA_beta3(SR, mean_j res);  SC <- EMA_beta3(SC, mean_i res)
//             update = (rsqrt(SR[l,i] / mean_i SR[l,:]) * rsqrt(SC[l,j])) * M
//   otherwise: update = M
//   theta <- theta + (-lambda * lr) * theta               if lambda != 0
//   theta <- theta - update * lr
//
// The state is float32 whatever the parameter type (S = float). The passes split the work as the
// CPU module does (Algorithm.passes = 2):
//   pre-pass:  stated_came_rows, stated_came_cols        factored: R, C updates
//              stated_came_row_mean                      zeroes stats and res sums; factored: mean_i R
//              stated_came_norms                         factored: stats[0] = ||U||^2
//              stated_came_finish (grid (1, nids))       factored: stats[1] = max(||U|| / sqrt(numel) / clip, 1)
//   pass 0:    stated_came_page0                         factored: M update, res row/column sums (float64
//                                                        atomics); unfactored: V update, stats[0] += ||U||^2
//   between:   stated_came_between                       factored: SR, SC updates
//              stated_came_between_mean                  factored: mean_i SR; unfactored: stats[1]
//   pass 1:    stated_came_page1                         factored: theta update; unfactored: M and theta
// (tensor-list kernels: grid (x, nids), 256 threads, any x.)
//
// Tensor table row: kind 1 factored (rows = n, cols = m, lead = L), kind 0 not.
//   small: 0 exp_avg_sq_row (S, L*n)   1 exp_avg_sq_col (S, L*m)
//          2 exp_avg_res_row (S, L*n)  3 exp_avg_res_col (S, L*m)
//          4 means scratch (float, 2L: mean_i R, then mean_i SR)
//          5 res sums scratch (double, L*n + L*m)                 (0 to 5: factored only)
//          6 stats scratch (double[4]: ||U||^2, divisor)
//   hp: 0 beta1  1 fl32(1 - beta1)  2 beta2  3 fl32(1 - beta2)  4 beta3  5 fl32(1 - beta3)
//       6 eps1   7 eps2             8 clip_threshold   9 lr   10 fl32(-lambda * lr)   11 lambda
//       12 fl32(sqrt(numel))        31 gradient multiplier
// Page kernels: (segs, nseg, tensors, param_arena, grad_arena, page, flags)
//   fields: 0 exp_avg (S)  1 exp_avg_sq (S, unfactored only)  2 master (float, optional).  flags: none.

#include "stated_common.cuh"

using namespace stated;

namespace {

// x * beta + (1 - beta) * y as the CPU module's `x.mul_(beta).add_(y, alpha=1 - beta)`.
__device__ __forceinline__ float ema(float x, float y, float beta, float one_minus) {
    return fmaf(y, one_minus, rn_mul(x, beta));
}

// rsqrt(row / mean) * rsqrt(col): the CPU module's _factors, multiplied out for one element.
__device__ __forceinline__ float factor(float row, float mean, float col) {
    return rn_mul(rsqrt_exact(rn_div(row, mean)), rsqrt_exact(col));
}

// U before clipping of a factored tensor.
template <typename S>
__device__ __forceinline__ float factored_u(const StTensor& t, float g, const Walk& w) {
    const float f = factor(to_float(small_ptr<const S>(t, 0)[w.q]), small_ptr<const float>(t, 4)[w.l],
                           to_float(small_ptr<const S>(t, 1)[w.col(t)]));
    return rn_mul(f, g);
}

// R and C (factored_stat): EMA_beta2(R, mean_j (g * g + eps1)), likewise C.
struct SquareMean {
    static __device__ __forceinline__ float square(const StTensor& t, float g) { return rn_add(rn_mul(g, g), t.hp[6]); }
    static __device__ __forceinline__ float update(const StTensor& t, float old, float sum, float count) {
        return ema(old, rn_div(sum, count), t.hp[2], t.hp[3]);
    }
};

// The CPU module's divisor: (norm / sqrt(numel) / clip).clamp(min=1) in float32, norm = fl32(sqrt(sum)).
__device__ __forceinline__ double divisor(const StTensor& t, double sum_squares) {
    const float norm = (float)sqrt(sum_squares);
    return (double)fmaxf(rn_div(rn_div(norm, t.hp[12]), t.hp[8]), 1.0f);
}

// Mean over i of a [L, n] row statistic into out[l] (one block per l).
template <typename S>
__device__ __forceinline__ void row_means_into(const StTensor& t, const S* row, float* out, float* scratch) {
    row_means(t, row, scratch, [&](long long l, float mean) { out[l] = mean; });
}

// theta after the update (decay first, as the CPU module's _apply). Without master weights theta
// is a P tensor on the CPU, so the decayed value is rounded to P there too.
template <typename P>
__device__ __forceinline__ float apply(const StTensor& t, float th, float update, bool master) {
    if (t.hp[11] != 0.0f) {  // ATen rounds add's alpha to a 16-bit tensor's type, then the sum
        th = master ? fmaf(th, t.hp[10], th) : round_to<P>(fmaf(th, round_to<P>(t.hp[10]), th));
    }
    return rn_sub(th, rn_mul(update, t.hp[9]));
}

}  // namespace

template <typename P, typename S>
__global__ void __launch_bounds__(ST_THREADS)
stated_came_rows(ST_LIST_PARAMS(P)) {
    factored_stat<true, S, SquareMean>(list_tensor(ids, tensors), grad_arena);
}

template <typename P, typename S>
__global__ void __launch_bounds__(ST_THREADS)
stated_came_cols(ST_LIST_PARAMS(P)) {
    factored_stat<false, S, SquareMean>(list_tensor(ids, tensors), grad_arena);
}

template <typename P, typename S>
__global__ void __launch_bounds__(ST_THREADS)
stated_came_row_mean(ST_LIST_PARAMS(P)) {
    __shared__ float scratch[ST_WARPS];
    const StTensor& t = list_tensor(ids, tensors);
    zero_stats(t, 6);
    if (t.kind != 1) return;
    double* sums = small_ptr<double>(t, 5);
    grid_stride(t.lead * (t.rows + t.cols), [&](long long k) { sums[k] = 0.0; });
    row_means_into(t, small_ptr<const S>(t, 0), small_ptr<float>(t, 4), scratch);
}

template <typename P, typename S>
__global__ void __launch_bounds__(ST_THREADS)
stated_came_norms(ST_LIST_PARAMS(P)) {
    __shared__ double scratch[ST_WARPS];
    const StTensor& t = list_tensor(ids, tensors);
    if (t.kind != 1) return;  // an unfactored tensor's ||U|| needs the new paged V: pass 0
    const P* g = grad_arena + t.grad;
    double sum_u = 0.0;
    grid_stride(t.numel, [&](long long e) {
        const double u = factored_u<S>(t, grad_at(g, e, t, false), Walk::at(t, e));
        sum_u += u * u;
    });
    block_accumulate(sum_u, &small_ptr<double>(t, 6)[0], scratch);
}

template <typename P, typename S>
__global__ void stated_came_finish(ST_LIST_PARAMS(P)) {
    if (!first_thread()) return;
    const StTensor& t = list_tensor(ids, tensors);
    if (t.kind != 1) return;
    double* stats = small_ptr<double>(t, 6);
    stats[1] = divisor(t, stats[0]);
}

template <typename P, typename S>
__global__ void __launch_bounds__(ST_THREADS)
stated_came_page0(ST_PAGE_PARAMS(P)) {
    __shared__ double scratch[ST_WARPS];
    for_each_tile(segs, nseg, tensors, [&](const StSegment& seg, const StTensor& t, long long first) {
        PageItems<P> it(seg, param_arena, grad_arena, page);
        const int n = it.start(seg, first);
        if (t.kind != 1) {  // V (field 1) changes; no early return: the block sums
            paged_moment(it, field_ptr<S>(page, seg, 1), &small_ptr<double>(t, 6)[0], scratch, [&](float graw, float& v) {
                const float gk = grad_value(graw, t, false);
                v = ema(v, rn_add(rn_mul(gk, gk), t.hp[6]), t.hp[2], t.hp[3]);
                return rn_mul(rsqrt_exact(v), gk);
            });
            return;
        }
        if (n == 0) return;  // factored tiles need no block-wide step; M (field 0) changes
        S* exp_avg = field_ptr<S>(page, seg, 0);
        it.vec = aligned16(it.grad) && aligned16(exp_avg);
        float g[ST_ITEMS], x[ST_ITEMS];
        it.load(it.grad, g);
        it.load(exp_avg, x);
        const float div = (float)small_ptr<const double>(t, 6)[1];
        double* row_sums = small_ptr<double>(t, 5);
        double* col_sums = row_sums + t.lead * t.rows;
        Walk w = Walk::at(t, seg.start + it.e0);
        double run = 0.0;
        long long run_row = w.q;
#pragma unroll
        for (int k = 0; k < ST_ITEMS; ++k) {
            if (k < n) {
                const float u = rn_div(factored_u<S>(t, grad_value(g[k], t, false), w), div);
                x[k] = ema(x[k], u, t.hp[0], t.hp[1]);
                const float d = rn_sub(u, x[k]);
                const double res = rn_add(rn_mul(d, d), t.hp[7]);
                if (w.q != run_row) { atomicAdd(&row_sums[run_row], run); run = 0.0; run_row = w.q; }
                run += res;
                atomicAdd(&col_sums[w.col(t)], res);
                w.next(t);
            }
        }
        atomicAdd(&row_sums[run_row], run);
        it.store(exp_avg, x);
    });
}

template <typename P, typename S>
__global__ void __launch_bounds__(ST_THREADS)
stated_came_between(ST_LIST_PARAMS(P)) {
    const StTensor& t = list_tensor(ids, tensors);
    if (t.kind != 1) return;
    S* res_row = small_ptr<S>(t, 2);
    S* res_col = small_ptr<S>(t, 3);
    const double* sums = small_ptr<const double>(t, 5);
    const long long nrows = t.lead * t.rows;
    grid_stride(nrows + t.lead * t.cols, [&](long long k) {
        // The CPU module's (sum / count).float(): a float64 quotient rounded once.
        if (k < nrows) {
            const float mean = (float)(sums[k] / (double)t.cols);
            res_row[k] = from_float<S>(ema(to_float(res_row[k]), mean, t.hp[4], t.hp[5]));
        } else {
            const long long c = k - nrows;
            const float mean = (float)(sums[k] / (double)t.rows);
            res_col[c] = from_float<S>(ema(to_float(res_col[c]), mean, t.hp[4], t.hp[5]));
        }
    });
}

template <typename P, typename S>
__global__ void __launch_bounds__(ST_THREADS)
stated_came_between_mean(ST_LIST_PARAMS(P)) {
    __shared__ float scratch[ST_WARPS];
    const StTensor& t = list_tensor(ids, tensors);
    if (t.kind != 1) {
        if (first_thread()) {
            double* stats = small_ptr<double>(t, 6);
            stats[1] = divisor(t, stats[0]);
        }
        return;
    }
    row_means_into(t, small_ptr<const S>(t, 2), small_ptr<float>(t, 4) + t.lead, scratch);
}

template <typename P, typename S>
__global__ void __launch_bounds__(ST_THREADS)
stated_came_page1(ST_PAGE_PARAMS(P)) {
    for_each_tile(segs, nseg, tensors, [&](const StSegment& seg, const StTensor& t, long long first) {
        const bool factored = t.kind == 1;
        PageItems<P> it(seg, param_arena, grad_arena, page, 2);
        S* exp_avg = field_ptr<S>(page, seg, 0);
        const S* exp_avg_sq = factored ? nullptr : field_ptr<const S>(page, seg, 1);
        it.vec = it.aligned_with(exp_avg, exp_avg_sq);
        if (it.start(seg, first) == 0) return;
        const bool master = it.master != nullptr;

        float m[ST_ITEMS], th[ST_ITEMS];
        it.load(exp_avg, m);
        it.load_theta(th);
        if (factored) {
            const S* res_row = small_ptr<const S>(t, 2);
            const S* res_col = small_ptr<const S>(t, 3);
            const float* res_mean = small_ptr<const float>(t, 4) + t.lead;
            Walk w = Walk::at(t, seg.start + it.e0);
#pragma unroll
            for (int k = 0; k < ST_ITEMS; ++k) {
                if (k < it.n) {
                    const float f = factor(to_float(res_row[w.q]), res_mean[w.l], to_float(res_col[w.col(t)]));
                    th[k] = apply<P>(t, th[k], rn_mul(f, m[k]), master);
                    w.next(t);
                }
            }
        } else {
            float g[ST_ITEMS], v[ST_ITEMS];
            it.load(it.grad, g);
            it.load(exp_avg_sq, v);
            const float div = (float)small_ptr<const double>(t, 6)[1];
#pragma unroll
            for (int k = 0; k < ST_ITEMS; ++k) {
                const float u = rn_div(rn_mul(rsqrt_exact(v[k]), grad_value(g[k], t, false)), div);
                m[k] = ema(m[k], u, t.hp[0], t.hp[1]);
                th[k] = apply<P>(t, th[k], m[k], master);
            }
            it.store(exp_avg, m);
        }
        it.store_theta(th);
    });
}
