// SGD with momentum, dampening and Nesterov (stated_kernels/sgd.py; ALGORITHMS.md section 2).
//
// The CPU update runs torch's per-op path; for float32 every op below is one ATen op with the same
// rounding (`a + alpha * b` is ATen's fused multiply-add form). For 16-bit parameters the CPU path
// rounds after every op while this kernel rounds once on store, so they agree to a few ulps of the
// parameter type, not bit for bit.
//
//   g <- g * hp[31]                     the gradient multiplier (Note [gradient multiplier])
//   g <- -g                             if MAXIMIZE
//   g <- g + weight_decay * theta       if weight_decay != 0 (L2)
//   if momentum != 0 and the buffer exists:
//       b <- g                          on the tensor's first step (hp[4] != 0): no dampening
//       b <- momentum * b + (1 - dampening) * g   afterwards
//       d <- g + momentum * b  (NESTEROV)  or  b
//   else d <- g
//   theta <- theta - lr * d
//
// Kernel: stated_sgd<P, S>(segs, nseg, tensors, param_arena, grad_arena, page, flags)
//   flags: ST_MAXIMIZE | ST_NESTEROV.
//   fields: 0 momentum_buffer (S, absent without momentum), 1 master (float, optional).
//   small: none.
//   hp: 0 fl32(-lr)   1 fl32(momentum)   2 fl32(1 - dampening)   3 fl32(weight_decay)
//       4 first step of this tensor's buffer (the CPU module's step == 1): 1.0 or 0.0
//       31 gradient multiplier

#include "stated_common.cuh"

using namespace stated;

template <typename P, typename S>
__global__ void __launch_bounds__(ST_THREADS)
stated_sgd(ST_PAGE_PARAMS(P)) {
    const bool maximize = flags & ST_MAXIMIZE;
    const bool nesterov = flags & ST_NESTEROV;
    for_each_tile(segs, nseg, tensors, [&](const StSegment& seg, const StTensor& t, long long first) {
        PageItems<P> it(seg, param_arena, grad_arena, page, 1);
        const float neg_lr = t.hp[0], mu = t.hp[1], damp = t.hp[2], wd = t.hp[3];
        const bool fresh = t.hp[4] != 0.0f;
        S* buf = mu != 0.0f ? field_ptr<S>(page, seg, 0) : nullptr;
        it.vec = it.aligned_with(buf);
        if (it.start(seg, first) == 0) return;

        float g[ST_ITEMS], th[ST_ITEMS], b[ST_ITEMS];
        it.load(it.grad, g);
        it.load_theta(th);
        if (buf && !fresh) it.load(buf, b);

        // Gradients, buffers and theta all have type S on the CPU (P, or float with master weights),
        // and its foreach operations round each result to it.
#pragma unroll
        for (int k = 0; k < ST_ITEMS; ++k) {
            float gk = round_to<S>(grad_value(g[k], t, maximize));
            if (wd != 0.0f) gk = round_to<S>(fmaf(th[k], wd, gk));
            float d = gk;
            if (buf) {
                b[k] = fresh ? gk : round_to<S>(fmaf(gk, damp, round_to<S>(rn_mul(b[k], mu))));
                d = nesterov ? round_to<S>(fmaf(b[k], mu, gk)) : b[k];
            }
            th[k] = fmaf(d, neg_lr, th[k]);
        }

        if (buf) it.store(buf, b);
        it.store_theta(th);
    });
}
