// Lion (stated_kernels/lion.py; ALGORITHMS.md section 6), following lion-pytorch.
//
//   g     <- g * hp[31]                          the gradient multiplier (Note [gradient multiplier])
//   theta <- theta * decay                       decay = 1 - lr * lambda' (lambda' = lambda / lr_initial
//                                                when the decay is decoupled; the host folds that in)
//   c     <- beta1 * m + (1 - beta1) * g
//   theta <- theta - lr * sign(c)                sign(0) = 0, sign(NaN) = NaN
//   m     <- beta2 * m + (1 - beta2) * g         after c is used
//
// Each line is one ATen op on the CPU (`a + alpha * b` being its fused multiply-add form).
//
// Kernel: stated_lion<P, S>(segs, nseg, tensors, param_arena, grad_arena, page, flags)
//   flags: ST_MAXIMIZE (negates g; off for the reference, which has no maximize).
//   fields: 0 exp_avg (S), 1 master (float, optional).
//   small: none.
//   hp: 0 decay fl32(1 - lr * lambda')   1 fl32(beta1)   2 fl32(1 - beta1)   3 fl32(beta2)
//       4 fl32(1 - beta2)                5 fl32(-lr)     31 gradient multiplier
//   (a decay of exactly 1.0, no weight decay, changes no bits, as the CPU module's skipped multiply)

#include "stated_common.cuh"

using namespace stated;

__device__ __forceinline__ float lion_sign(float c) {
    return c > 0.0f ? 1.0f : (c < 0.0f ? -1.0f : c * 0.0f);  // keeps 0 as 0 and NaN as NaN
}

template <typename P, typename S>
__global__ void __launch_bounds__(ST_THREADS)
stated_lion(ST_PAGE_PARAMS(P)) {
    const bool maximize = flags & ST_MAXIMIZE;
    for_each_tile(segs, nseg, tensors, [&](const StSegment& seg, const StTensor& t, long long first) {
        PageItems<P> it(seg, param_arena, grad_arena, page, 1);
        S* exp_avg = field_ptr<S>(page, seg, 0);
        it.vec = it.aligned_with(exp_avg);
        if (it.start(seg, first) == 0) return;
        const float decay = t.hp[0], beta1 = t.hp[1], c1 = t.hp[2], beta2 = t.hp[3], c2 = t.hp[4];
        const float neg_lr = t.hp[5];

        float g[ST_ITEMS], th[ST_ITEMS], m[ST_ITEMS];
        it.load(it.grad, g);
        it.load_theta(th);
        it.load(exp_avg, m);

#pragma unroll
        for (int k = 0; k < ST_ITEMS; ++k) {
            // Everything has type S on the CPU (P, or float with master weights), and its foreach
            // operations round each result to it.
            const float gk = round_to<S>(grad_value(g[k], t, maximize));
            th[k] = round_to<S>(rn_mul(th[k], decay));
            const float c = round_to<S>(fmaf(gk, c1, round_to<S>(rn_mul(m[k], beta1))));
            th[k] = fmaf(lion_sign(c), neg_lr, th[k]);
            m[k] = fmaf(gk, c2, round_to<S>(rn_mul(m[k], beta2)));
        }

        it.store(exp_avg, m);
        it.store_theta(th);
    });
}
