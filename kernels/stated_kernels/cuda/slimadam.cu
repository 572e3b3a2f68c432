// SlimAdam (stated_kernels/slimadam.py; ALGORITHMS.md section 7), following low-memory-adam SlimAdamW.
//
//   g     <- g * hp[31]                                    the gradient multiplier (no maximize)
//   mu    <- mu * beta1 + (1 - beta1) * g                  (ATen: fma(g, 1 - beta1, round(mu * beta1)))
//   nu    <- nu * beta2 + (1 - beta2) * mean_K(g * g)      compressed tensors, in the pre-pass
//   nu    <- nu * beta2 + (1 - beta2) * g * g              uncompressed tensors, paged, in the page pass
//   theta <- theta * (1 - lr * lambda)                     if lambda > 0 (the host sends 0 for ndim < 2)
//   theta <- theta - lr * ((mu / bc1) / (sqrt(nu / bc2) + eps))    nu broadcast over K
//
// Every line rounds as the CPU module's torch operations do (Note [rounding like the CPU]); with a
// 16-bit state type S each intermediate the CPU computes in S is rounded to S.
//
// K (the CPU module's `_rule`: sorted dims) is any set of dims. The tensor's shape is collapsed into
// runs of consecutive dims that are all in K or all out of it:
// - kind 1, one run in K: the tensor is [outer, mid, inner] with mid the K run; nu has outer * inner
//   entries, nu[o * inner + k]. lead = outer, rows = mid, cols = inner. Every static rule is this.
// - kind 2, any other K: small[1] holds the runs, int64 [R, K mask (bit r: run r is in K), size of
//   run 0 (outermost), ..., size of run R - 1], R <= ST_MAX_RUNS. nu is indexed by the dims out of
//   K, in order. lead = nu entries, rows = the K count (product of the K dims), cols = 1.
//
// Launch order for one step (tensor-list kernels use grid (x, nids), 256 threads, any x):
//   stated_slimadam_reduce  (ids, nids, tensors, param_arena, grad_arena, flags)
//       compressed tensors: the nu update
//   stated_slimadam_page    (segs, nseg, tensors, param_arena, grad_arena, page, flags)
//
// Tensor table row: kind 0 uncompressed, 1 or 2 compressed (above).
//   small: 0 nu (S, the CPU module's small "nu": lead * cols entries)   1 runs (int64, kind 2 only)
//   hp: 0 beta1  1 fl32(1 - beta1)  2 beta2  3 fl32(1 - beta2)  4 eps  5 lr
//       6 decay fl32(1 - lr * lambda)  7 lambda (0 for ndim < 2)  8 fl32(1 - beta1^t)  9 fl32(1 - beta2^t)
//       31 gradient multiplier
//   fields: 0 mu (S)  1 nu (S, kind 0 only)  2 master (float, optional)
//   flags: none.

#include "stated_common.cuh"

using namespace stated;

namespace {

constexpr int ST_MAX_RUNS = 8;

// Element index (in the tensor) of entry j of nu and index kk within the K subspace (kind 2).
__device__ __forceinline__ long long runs_element(const long long* runs, long long j, long long kk) {
    const int nruns = (int)runs[0];
    const long long kmask = runs[1];
    long long e = 0, stride = 1;
    for (int r = nruns - 1; r >= 0; --r) {
        const long long size = runs[2 + r];
        long long idx;
        if ((kmask >> r) & 1) { idx = kk % size; kk /= size; } else { idx = j % size; j /= size; }
        e += idx * stride;
        stride *= size;
    }
    return e;
}

// Walks the nu index of consecutive tensor elements for kind 2: start(e) then next() per element.
struct RunsWalk {
    long long idx[ST_MAX_RUNS], size[ST_MAX_RUNS], step[ST_MAX_RUNS];  // step: nu stride, 0 in K
    int nruns;
    long long nu;
    __device__ __forceinline__ void start(const long long* runs, long long e) {
        nruns = (int)runs[0];
        const long long kmask = runs[1];
        long long stride = 1;
        nu = 0;
        for (int r = nruns - 1; r >= 0; --r) {
            size[r] = runs[2 + r];
            const bool in_k = (kmask >> r) & 1;
            step[r] = in_k ? 0 : stride;
            if (!in_k) stride *= size[r];
            idx[r] = e % size[r];
            e /= size[r];
            nu += idx[r] * step[r];
        }
    }
    __device__ __forceinline__ void next() {
        for (int r = nruns - 1; r >= 0; --r) {
            nu += step[r];
            if (++idx[r] < size[r]) return;
            nu -= size[r] * step[r];
            idx[r] = 0;
        }
    }
};

template <typename S>
__device__ __forceinline__ void nu_update(S* nu, long long c, float sum, float count, const StTensor& t) {
    const float mean = round_to<S>(rn_div(sum, count));
    nu[c] = from_float<S>(fmaf(mean, t.hp[3], round_to<S>(rn_mul(to_float(nu[c]), t.hp[2]))));
}

}  // namespace

template <typename P, typename S>
__global__ void __launch_bounds__(ST_THREADS)
stated_slimadam_reduce(ST_LIST_PARAMS(P)) {
    const StTensor& t = tensors[ids[blockIdx.y]];
    if (t.kind == 0) return;
    const P* g = grad_arena + t.grad;
    S* nu = small_ptr<S>(t, 0);
    const float count = (float)t.rows;
    auto square = [&](long long i) { const float x = grad_at(g, i, t, false); return round_to<S>(rn_mul(x, x)); };
    if (t.kind == 1) {
        reduce_mid(t.lead, t.rows, t.cols, square,
                   [&](long long c, float sum) { nu_update(nu, c, sum, count, t); });
        return;
    }
    // kind 2: one warp per nu entry, its lanes striding over the K subspace.
    const long long* runs = small_ptr<const long long>(t, 1);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (long long j = (long long)blockIdx.x * ST_WARPS + warp; j < t.lead; j += (long long)gridDim.x * ST_WARPS) {
        float s = 0.0f;
        for (long long kk = lane; kk < t.rows; kk += 32) s += square(runs_element(runs, j, kk));
        s = warp_sum(s);
        if (lane == 0) nu_update(nu, j, s, count, t);
    }
}

template <typename P, typename S>
__global__ void __launch_bounds__(ST_THREADS)
stated_slimadam_page(ST_PAGE_PARAMS(P)) {
    for_each_tile(segs, nseg, tensors, [&](const StSegment& seg, const StTensor& t, long long first) {
        const bool compressed = t.kind != 0;
        P* param = param_arena + seg.param;
        const P* grad = grad_arena + seg.grad;
        S* mu = field_ptr<S>(page, seg, 0);
        S* nu_field = compressed ? nullptr : field_ptr<S>(page, seg, 1);
        float* master = field_ptr<float>(page, seg, 2);
        const bool vec = aligned16(param) && aligned16(grad) && aligned16(mu) && aligned16(nu_field) &&
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
        load_items(mu + e0, n, vec, m);
        if (!compressed) {
            load_items(nu_field + e0, n, vec, v);
        } else if (t.kind == 1) {
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
        } else {
            const S* nu = small_ptr<const S>(t, 0);
            RunsWalk w;
            w.start(small_ptr<const long long>(t, 1), seg.start + e0);
#pragma unroll
            for (int k = 0; k < ST_ITEMS; ++k) {
                v[k] = k < n ? to_float(nu[w.nu]) : 0.0f;
                if (k + 1 < n) w.next();
            }
        }

#pragma unroll
        for (int k = 0; k < ST_ITEMS; ++k) {
            const float gk = grad_value(g[k], t, false);
            m[k] = round_to<S>(fmaf(gk, c1, round_to<S>(rn_mul(m[k], beta1))));
            if (!compressed) {
                v[k] = round_to<S>(fmaf(round_to<S>(rn_mul(gk, gk)), c2, round_to<S>(rn_mul(v[k], beta2))));
            }
            // sqrt(nu / bc2) + eps in S, as the CPU module forms it (once per step for a compressed nu).
            const float denom = round_to<S>(rn_add(round_to<S>(rn_sqrt(round_to<S>(rn_div(v[k], bc2)))), eps));
            // theta has type S here: P without master weights, the float master copy with them.
            if (decays) th[k] = round_to<S>(rn_mul(th[k], decay));
            const float update = round_to<S>(rn_mul(lr, round_to<S>(rn_div(round_to<S>(rn_div(m[k], bc1)), denom))));
            th[k] = rn_sub(th[k], update);
        }

        store_items(mu + e0, n, vec, m);
        if (!compressed) store_items(nu_field + e0, n, vec, v);
        if (master) store_items(master + e0, n, vec, th);
        store_items(param + e0, n, vec, th);
    });
}
