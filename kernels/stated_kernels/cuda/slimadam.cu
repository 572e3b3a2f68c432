// SlimAdam (stated_kernels/slimadam.py; ALGORITHMS.md section 7), following low-memory-adam SlimAdamW.
//
//   mu    <- mu * beta1 + (1 - beta1) * g
//   nu    <- nu * beta2 + (1 - beta2) * mean_K(g * g)      compressed tensors (kind 1), in the pre-pass
//   nu    <- nu * beta2 + (1 - beta2) * g * g              plain tensors (kind 0), paged, in the page pass
//   theta <- theta * (1 - lr * lambda)                     if lambda > 0 (the host sends 0 for ndim < 2)
//   theta <- theta - lr * ((mu / bc1) / (sqrt(nu / bc2) + eps))    nu broadcast over K
//
// K must be one run of consecutive dims: the tensor is viewed as [outer, mid, inner] with mid the
// product of the K dims, and nu has outer * inner entries, nu[o * inner + k]. (Every rule of the
// reference is a single dim; a non-consecutive K needs the CPU path.)
//
// Launch order for one step of one group:
//   stated_slimadam_reduce  (ids, nids, tensors, param_arena, grad_arena, flags)  grid (x, nids)
//       compressed tensors: the nu update
//   stated_slimadam_page    (segs, nseg, tensors, param_arena, grad_arena, page, flags)
//
// Tensor table row: kind 1 compressed (lead = outer, rows = mid, cols = inner), kind 0 not.
//   small: 0 nu (S, outer * inner; kind 1 only)
//   hp: 0 beta1  1 fl32(1 - beta1)  2 beta2  3 fl32(1 - beta2)  4 eps  5 lr
//       6 decay fl32(1 - lr * lambda)  7 lambda  8 fl32(1 - beta1^t)  9 fl32(1 - beta2^t)
//   fields: 0 exp_avg (S)  1 exp_avg_sq (S, kind 0 only)  2 master weights (float, optional)
//   flags: ST_MAXIMIZE (off for the reference).

#include "stated_common.cuh"

using namespace stated;

template <typename P, typename S>
__global__ void __launch_bounds__(ST_THREADS)
stated_slimadam_reduce(const int* __restrict__ ids, int nids, const StTensor* __restrict__ tensors,
                       const P* __restrict__ param_arena, const P* __restrict__ grad_arena, unsigned flags) {
    const StTensor& t = tensors[ids[blockIdx.y]];
    if (t.kind != 1) return;
    const P* g = grad_arena + t.grad;
    S* nu = small_ptr<S>(t, 0);
    const float beta2 = t.hp[2], c2 = t.hp[3], mid = (float)t.rows;
    reduce_mid(t.lead, t.rows, t.cols,
               [&](long long i) { const float x = to_float(g[i]); return x * x; },
               [&](long long c, float sum) { nu[c] = from_float<S>(fmaf(sum / mid, c2, to_float(nu[c]) * beta2)); });
}

template <typename P, typename S>
__global__ void __launch_bounds__(ST_THREADS)
stated_slimadam_page(const StSegment* __restrict__ segs, int nseg, const StTensor* __restrict__ tensors,
                     P* __restrict__ param_arena, const P* __restrict__ grad_arena, unsigned char* __restrict__ page,
                     unsigned flags) {
    const bool maximize = flags & ST_MAXIMIZE;
    for_each_tile(segs, nseg, tensors, [&](const StSegment& seg, const StTensor& t, long long first) {
        const bool compressed = t.kind == 1;
        P* param = param_arena + seg.param;
        const P* grad = grad_arena + seg.grad;
        S* exp_avg = field_ptr<S>(page, seg, 0);
        S* exp_avg_sq = compressed ? nullptr : field_ptr<S>(page, seg, 1);
        float* master = field_ptr<float>(page, seg, 2);
        const bool vec = aligned16(param) && aligned16(grad) && aligned16(exp_avg) && aligned16(exp_avg_sq) &&
                         aligned16(master);
        long long e0;
        const int n = thread_items(seg, first, e0);
        if (n == 0) return;
        const float beta1 = t.hp[0], c1 = t.hp[1], beta2 = t.hp[2], c2 = t.hp[3], eps = t.hp[4], lr = t.hp[5];
        const float decay = t.hp[6], bc1 = t.hp[8], bc2 = t.hp[9];
        const bool decays = t.hp[7] > 0.0f;

        float g[ST_ITEMS], th[ST_ITEMS], m[ST_ITEMS], v[ST_ITEMS];
        load_items(grad + e0, n, vec, g);
        if (master) load_items(master + e0, n, vec, th); else load_items(param + e0, n, vec, th);
        load_items(exp_avg + e0, n, vec, m);
        if (!compressed) {
            load_items(exp_avg_sq + e0, n, vec, v);
        } else {
            // Element e = (o * mid + b) * inner + k reads nu[o * inner + k]; walk (o, b, k) forward.
            const S* nu = small_ptr<const S>(t, 0);
            const long long e = seg.start + e0;
            const long long ob = e / t.cols;
            long long k_in = e - ob * t.cols, o = ob / t.rows, b = ob - o * t.rows;
#pragma unroll
            for (int k = 0; k < ST_ITEMS; ++k) {
                v[k] = k < n ? to_float(nu[o * t.cols + k_in]) : 0.0f;
                if (++k_in == t.cols) { k_in = 0; if (++b == t.rows) { b = 0; ++o; } }
            }
        }

#pragma unroll
        for (int k = 0; k < ST_ITEMS; ++k) {
            const float gk = maximize ? -g[k] : g[k];
            m[k] = fmaf(gk, c1, m[k] * beta1);
            if (!compressed) v[k] = fmaf(gk * gk, c2, v[k] * beta2);
            if (decays) th[k] = th[k] * decay;
            th[k] = th[k] - lr * ((m[k] / bc1) / (sqrtf(v[k] / bc2) + eps));
        }

        store_items(exp_avg + e0, n, vec, m);
        if (!compressed) store_items(exp_avg_sq + e0, n, vec, v);
        if (master) store_items(master + e0, n, vec, th);
        store_items(param + e0, n, vec, th);
    });
}
