// Adam and AdamW (stated_kernels/adamw.py; ALGORITHMS.md section 1), one page launch per group.
//
// The arithmetic follows torch's fused CPU kernel, which is what the CPU update runs: values are
// decoded to float, every scalar arrives already rounded from float64, and each stored value is
// rounded once. With DECOUPLED set (AdamW) the weight decay multiplies theta; without it (Adam)
// it is added to the gradient (L2).
//
//   g     <- g * hp[31]                the gradient multiplier (Note [gradient multiplier])
//   g     <- -g                        if MAXIMIZE
//   theta <- theta * decay             if weight_decay != 0 and DECOUPLED
//   g     <- g + theta * weight_decay  if weight_decay != 0 and not DECOUPLED
//   m     <- lerp(m, g, 1 - beta1)     (ATen's two-sided lerp, one fma)
//   v     <- v * beta2 + (1 - beta2) * g * g  (as fma((1 - beta2) * g, g, v * beta2))
//   vmax  <- max(vmax, v)              if AMSGRAD; it replaces v below
//   theta <- theta + neg_step_size * m / (sqrt(v) / bc2_sqrt + eps)
//
// Kernel: stated_adamw<P, S>(segs, nseg, tensors, param_arena, grad_arena, page, flags)
//   P: parameter and gradient type (float, __nv_bfloat16, __half); S: state type (float or P).
//   flags: ST_MAXIMIZE | ST_AMSGRAD | ST_DECOUPLED.
//   fields: 0 exp_avg (S), 1 exp_avg_sq (S), 2 max_exp_avg_sq (S, with AMSGRAD), 3 master (float,
//           optional: when present theta is read from and written to it, and the parameter
//           receives the rounded value). S is the CPU module's field dtype: the parameter's, or
//           float with master weights.
//   small: none (the step count stays on the host; it reaches the kernel through hp 6 and 7).
//   hp: 0 lerp weight fl32(1 - beta1)      1 fl32(beta2)          2 fl32(1 - beta2)
//       3 fl32(eps)                         4 fl32(weight_decay)   5 decay fl32(1 - lr * weight_decay)
//       6 fl32(-lr / (1 - beta1^t))         7 fl32(sqrt(1 - beta2^t))      (all from float64, per tensor)
//       31 gradient multiplier

#include "stated_common.cuh"

using namespace stated;

template <typename P, typename S>
__global__ void __launch_bounds__(ST_THREADS)
stated_adamw(ST_PAGE_PARAMS(P)) {
    const bool maximize = flags & ST_MAXIMIZE;
    const bool amsgrad = flags & ST_AMSGRAD;
    const bool decoupled = flags & ST_DECOUPLED;
    for_each_tile(segs, nseg, tensors, [&](const StSegment& seg, const StTensor& t, long long first) {
        PageItems<P> it(seg, param_arena, grad_arena, page, 3);
        S* exp_avg = field_ptr<S>(page, seg, 0);
        S* exp_avg_sq = field_ptr<S>(page, seg, 1);
        S* max_exp_avg_sq = amsgrad ? field_ptr<S>(page, seg, 2) : nullptr;
        it.vec = it.aligned_with(exp_avg, exp_avg_sq, max_exp_avg_sq);
        if (it.start(seg, first) == 0) return;

        const float w1 = t.hp[0], beta2 = t.hp[1], c2 = t.hp[2], eps = t.hp[3];
        const float wd = t.hp[4], decay = t.hp[5], neg_step = t.hp[6], bc2_sqrt = t.hp[7];

        float g[ST_ITEMS], th[ST_ITEMS], m[ST_ITEMS], v[ST_ITEMS], vm[ST_ITEMS];
        it.load(it.grad, g);
        it.load_theta(th);
        it.load(exp_avg, m);
        it.load(exp_avg_sq, v);
        if (amsgrad) it.load(max_exp_avg_sq, vm);

        // The fused CPU kernel's roundings (Note [rounding like the CPU]): its L2 term and its v are
        // fused multiply-adds, the rest is rounded operation by operation.
#pragma unroll
        for (int k = 0; k < ST_ITEMS; ++k) {
            float gk = grad_value(g[k], t, maximize);
            if (wd != 0.0f) {
                if (decoupled) th[k] = rn_mul(th[k], decay);
                else gk = fmaf(th[k], wd, gk);
            }
            m[k] = lerp_aten(m[k], gk, w1);
            v[k] = fmaf(rn_mul(c2, gk), gk, rn_mul(v[k], beta2));
            float second = v[k];
            if (amsgrad) { vm[k] = nan_max(vm[k], v[k]); second = vm[k]; }
            const float denom = rn_add(rn_div(rn_sqrt(second), bc2_sqrt), eps);
            th[k] = rn_add(th[k], rn_div(rn_mul(neg_step, m[k]), denom));
        }

        it.store(exp_avg, m);
        it.store(exp_avg_sq, v);
        if (amsgrad) it.store(max_exp_avg_sq, vm);
        it.store_theta(th);
    });
}
