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

// U at the element `w` of a factored tensor.
template <typename S>
__device__ __forceinline__ float factored_u(const StTensor& t, float g, const Walk& w) {
    const S* row_var = small_ptr<const S>(t, 0);
    const S* col_var = small_ptr<const S>(t, 1);
    const float* rmean = small_ptr<const float>(t, 2);
    const float vhat = round_to<S>(rn_div(round_to<S>(rn_mul(to_float(row_var[w.q]), to_float(col_var[w.col(t)]))), rmean[w.l]));
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

// Row and column variance (factored_stat): lerp(R, ||g[l,i,:]||^2 / m, w), likewise C.
template <typename S> struct Variance {
    static __device__ __forceinline__ float square(const StTensor&, float g) {
        const float x = round_to<S>(g);
        return rn_mul(x, x);
    }
    static __device__ __forceinline__ float update(const StTensor& t, float old, float sum, float count) {
        return lerp_aten(old, mean_square<S>(sum, count), t.hp[0]);
    }
};

// scale = -alpha / max(1, ||U|| / (sqrt(numel) d)).
__device__ __forceinline__ double step_scale(const StTensor& t, double alpha, double norm_u) {
    return -alpha / fmax(1.0, norm_u / (sqrt((double)t.numel) * hp_double(t, 9)));
}

}  // namespace

template <typename P, typename S>
__global__ void __launch_bounds__(ST_THREADS)
stated_adafactor_rows(ST_LIST_PARAMS(P)) {
    factored_stat<true, S, Variance<S>>(list_tensor(ids, tensors), grad_arena);
}

template <typename P, typename S>
__global__ void __launch_bounds__(ST_THREADS)
stated_adafactor_cols(ST_LIST_PARAMS(P)) {
    factored_stat<false, S, Variance<S>>(list_tensor(ids, tensors), grad_arena);
}

template <typename P, typename S>
__global__ void __launch_bounds__(ST_THREADS)
stated_adafactor_row_mean(ST_LIST_PARAMS(P)) {
    __shared__ float scratch[ST_WARPS];
    const StTensor& t = list_tensor(ids, tensors);
    zero_stats(t, 3);
    if (t.kind != 1) return;
    float* rmean = small_ptr<float>(t, 2);
    row_means(t, small_ptr<const S>(t, 0), scratch,
              [&](long long l, float mean) { rmean[l] = round_to<S>(clamp_min(round_to<S>(mean), t.hp[1])); });
}

template <typename P, typename S>
__global__ void __launch_bounds__(ST_THREADS)
stated_adafactor_norms(ST_LIST_PARAMS(P)) {
    __shared__ double scratch[ST_WARPS];
    const StTensor& t = list_tensor(ids, tensors);
    const P* th = param_arena + t.param;
    const P* g = grad_arena + t.grad;
    double* stats = small_ptr<double>(t, 3);
    const bool factored = t.kind == 1;
    double sum_theta = 0.0, sum_u = 0.0;
    grid_stride(t.numel, [&](long long e) {
        const double p = round_to<S>(to_float(th[e]));
        sum_theta += p * p;
        if (factored) {
            const double u = factored_u<S>(t, round_to<S>(grad_at(g, e, t, false)), Walk::at(t, e));
            sum_u += u * u;
        }
    });
    // Every block of the tensor's row reaches both reductions (no early exit above).
    block_accumulate(sum_theta, &stats[0], scratch);
    if (factored) block_accumulate(sum_u, &stats[1], scratch);
}

template <typename P, typename S>
__global__ void stated_adafactor_finish(ST_LIST_PARAMS(P)) {
    if (!first_thread()) return;
    const StTensor& t = list_tensor(ids, tensors);
    double* stats = small_ptr<double>(t, 3);
    const double rms = norm_of<S>(stats[0]) / sqrt((double)t.numel);
    const double alpha = fmax(hp_double(t, 7), rms) * hp_double(t, 5);
    stats[3] = alpha;
    if (t.kind == 1) stats[2] = step_scale(t, alpha, norm_of<S>(stats[1]));
}

template <typename P, typename S>
__global__ void __launch_bounds__(ST_THREADS)
stated_adafactor_page0(ST_PAGE_PARAMS(P)) {
    __shared__ double scratch[ST_WARPS];
    const bool maximize = flags & ST_MAXIMIZE;
    for_each_tile(segs, nseg, tensors, [&](const StSegment& seg, const StTensor& t, long long first) {
        if (t.kind == 1) return;  // the whole block leaves: a tile belongs to one tensor
        PageItems<P> it(seg, param_arena, grad_arena, page);
        it.start(seg, first);  // no early return: the block sums below
        paged_moment(it, field_ptr<S>(page, seg, 0), &small_ptr<double>(t, 3)[1], scratch, [&](float graw, float& v) {
            const float gk = round_to<S>(grad_value(graw, t, maximize));
            v = round_to<S>(lerp_aten(v, round_to<S>(rn_mul(gk, gk)), t.hp[0]));
            return unfactored_u<S>(t, gk, v);
        });
    });
}

template <typename P, typename S>
__global__ void stated_adafactor_between(ST_LIST_PARAMS(P)) {
    if (!first_thread()) return;
    const StTensor& t = list_tensor(ids, tensors);
    if (t.kind == 1) return;
    double* stats = small_ptr<double>(t, 3);
    stats[2] = step_scale(t, stats[3], sqrt(stats[1]));  // the CPU module's math.sqrt of its float64 fold
}

template <typename P, typename S>
__global__ void __launch_bounds__(ST_THREADS)
stated_adafactor_page1(ST_PAGE_PARAMS(P)) {
    const bool maximize = flags & ST_MAXIMIZE;
    for_each_tile(segs, nseg, tensors, [&](const StSegment& seg, const StTensor& t, long long first) {
        const bool factored = t.kind == 1;
        PageItems<P> it(seg, param_arena, grad_arena, page, 1);
        const S* variance = factored ? nullptr : field_ptr<const S>(page, seg, 0);
        it.vec = it.aligned_with(variance);
        if (it.start(seg, first) == 0) return;
        // ATen rounds add's alpha to a 16-bit tensor's type.
        const float scale = round_to<S>((float)small_ptr<const double>(t, 3)[2]);
        const bool decay = t.hp[4] != 0.0f;

        float g[ST_ITEMS], th[ST_ITEMS], v[ST_ITEMS];
        it.load(it.grad, g);
        it.load_theta(th);
        if (!factored) it.load(variance, v);

        Walk w{0, 0, 0, 0};
        if (factored) w.start(t, seg.start + it.e0);
#pragma unroll
        for (int k = 0; k < ST_ITEMS; ++k) {
            if (k < it.n) {
                const float gk = round_to<S>(grad_value(g[k], t, maximize));
                float u;
                if (factored) {
                    u = factored_u<S>(t, gk, w);
                    w.next(t);
                } else {
                    u = unfactored_u<S>(t, gk, v[k]);
                }
                // theta has type S: P without master weights, the float master copy with them.
                if (decay) th[k] = round_to<S>(rn_mul(th[k], t.hp[3]));
                th[k] = fmaf(u, scale, th[k]);
            }
        }
        it.store_theta(th);
    });
}
