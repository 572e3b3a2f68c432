// Blockwise 8-bit AdamW (stated_kernels/adamw8bit.py; ALGORITHMS.md section 3.3), torchao math.
//
// State of a quantized tensor (kind 1; numel >= 4096 and a multiple of 256): uint8 codes for m
// (signed dynamic map) and v (unsigned map), and one float scale per 256-element block of each,
// where scale = max(max |x| over the block, 1e-12). A value decodes as qmap[code] * scale. Other
// tensors (kind 0) keep m and v as plain values of type S and run the same math unquantized.
//
// Every operation is one float32 operation rounded on its own, in the CPU module's order (which is
// compiled torchao's, Note [compiled torchao] in adamw8bit.py, built without contraction), so the
// rn_* operations spell it out (Note [rounding like the CPU]):
//
//   g     <- g * hp[31]                             the gradient multiplier (no maximize)
//   theta <- theta - theta * lr_wd                  lr_wd = fl32(fl32(lr) * fl32(lambda)), always decoupled
//   m     <- lerp(deq(m), g, 1 - beta1)             decoded with the block's OLD scale
//   v     <- lerp(deq(v), g * g, 1 - beta2)         lerp: (b - a) * w + a, or (b - a) * (w - 1) + b when
//                                                   |w| >= 0.5, three roundings
//   vmax  <- max(deq(vmax), v)                      AMSGRAD (stored with the unsigned map)
//   theta <- theta - ((m / bc1) * lr) / (sqrt(v or vmax) / bc2_sqrt + eps)   unquantized m, v
//   new scale = max(max |m| over the block, 1e-12) (likewise v, vmax); code = nearest map entry of
//   x / scale, found by binary search (the largest i with q[i] <= x), then moved up one when
//   x - q[i] >= (q[i + 1] - q[i]) * 0.5, so that ties round up.
//
// One warp owns one 256-element block (32 lanes x 8 consecutive elements), so a block's new scale
// is one warp reduction; a tile (2048 elements) is 8 blocks. Segments of quantized tensors start
// on block boundaries (Algorithm.block_elements = 256), so segment-relative block b is the b-th
// scale of the segment's scale fields.
//
// Kernel: stated_adamw8bit<P, S>(segs, nseg, tensors, param_arena, grad_arena, page, flags, qmaps)
//   qmaps: 512 floats in device memory: the signed map (256, ascending) then the unsigned map (256).
//   flags: ST_AMSGRAD.
//   fields, kind 1: 0 exp_avg (uint8)  1 exp_avg_sq (uint8)  2 max_exp_avg_sq (uint8)
//                   3 exp_avg_scale (float)  4 exp_avg_sq_scale (float)  5 max_exp_avg_sq_scale (float)
//                   6 master (float, optional)
//   fields, kind 0: 0 exp_avg (S)  1 exp_avg_sq (S)  2 max_exp_avg_sq (S)  6 master (float)
//   small: none.
//   hp: 0 fl32(lr)   1 lr_wd   2 fl32(1 - beta1)   3 fl32(1 - beta2)   4 fl32(eps)
//       5 bc1 = 1 - beta1^t   6 bc2_sqrt = sqrt(1 - beta2^t)   (float32, computed as the CPU module does)
//       7 1.0 when |1 - beta1| >= 0.5 (lerp's second form), else 0   8 the same for 1 - beta2
//       31 gradient multiplier

#include "stated_common.cuh"

using namespace stated;

namespace {

__device__ __noinline__ unsigned int quantize(const float* q, float x) {
    unsigned int c = 0;
#pragma unroll 1
    for (unsigned int step = 128; step > 0; step >>= 1) {
        if (x >= q[c + step]) c += step;
    }
    const unsigned int up = c < 255 ? c + 1 : 255;
    const float lo = q[c], hi = q[up];
    return (rn_sub(x, lo) >= rn_mul(rn_sub(hi, lo), 0.5f)) ? up : c;
}

// New scale of this warp's block and the codes of this thread's values. Lanes past the end hold 0,
// which never raises the block's maximum.
__device__ __forceinline__ float requantize(const float* q, const float (&x)[ST_ITEMS], int n,
                                           unsigned int (&codes)[ST_ITEMS]) {
    float amax = 0.0f;
#pragma unroll
    for (int k = 0; k < ST_ITEMS; ++k) if (k < n) amax = fmaxf(amax, fabsf(x[k]));
    const float scale = fmaxf(warp_max(amax), 1e-12f);
#pragma unroll
    for (int k = 0; k < ST_ITEMS; ++k) codes[k] = quantize(q, rn_div(x[k], scale));
    return scale;
}

// The CPU module's _lerp: every operation rounded on its own; `second` picks (b - a) * (w - 1) + b.
__device__ __forceinline__ float lerp_rounded(float a, float b, float w, bool second) {
    const float d = rn_sub(b, a);
    return second ? rn_add(rn_mul(d, rn_sub(w, 1.0f)), b) : rn_add(rn_mul(d, w), a);
}

}  // namespace

template <typename P, typename S>
__global__ void __launch_bounds__(ST_THREADS)
stated_adamw8bit(ST_PAGE_PARAMS(P), const float* __restrict__ qmaps) {
    __shared__ float qsigned[256], qunsigned[256];
    qsigned[threadIdx.x] = qmaps[threadIdx.x];
    qunsigned[threadIdx.x] = qmaps[256 + threadIdx.x];
    __syncthreads();

    const bool amsgrad = flags & ST_AMSGRAD;
    const int lane = threadIdx.x & 31;

    for_each_tile(segs, nseg, tensors, [&](const StSegment& seg, const StTensor& t, long long first) {
        const bool quantized = t.kind == 1;
        P* param = param_arena + seg.param;
        const P* grad = grad_arena + seg.grad;
        float* master = field_ptr<float>(page, seg, 6);
        long long e0;
        // No early return: the whole warp takes part in the block reductions.
        const int n = thread_items(seg, first, e0);
        const long long e = n > 0 ? e0 : 0;  // a valid address for lanes past the end

        const float lr = t.hp[0], lr_wd = t.hp[1], w1 = t.hp[2], w2 = t.hp[3], eps = t.hp[4];
        const float bc1 = t.hp[5], bc2_sqrt = t.hp[6];
        const bool second1 = t.hp[7] != 0.0f, second2 = t.hp[8] != 0.0f;

        float g[ST_ITEMS], th[ST_ITEMS], m[ST_ITEMS], v[ST_ITEMS], vm[ST_ITEMS];
        bool vec = aligned16(param) && aligned16(grad) && aligned16(master);
        unsigned char *cm = nullptr, *cv = nullptr, *cvm = nullptr;
        float *sm = nullptr, *sv = nullptr, *svm = nullptr;
        S *pm = nullptr, *pv = nullptr, *pvm = nullptr;
        const long long block = e >> 8;  // segment-relative 256-element block
        if (quantized) {
            cm = field_ptr<unsigned char>(page, seg, 0);
            cv = field_ptr<unsigned char>(page, seg, 1);
            sm = field_ptr<float>(page, seg, 3);
            sv = field_ptr<float>(page, seg, 4);
            if (amsgrad) { cvm = field_ptr<unsigned char>(page, seg, 2); svm = field_ptr<float>(page, seg, 5); }
            unsigned int c[ST_ITEMS];
            // Codes are 8 bytes a thread: fields are 64-byte aligned and e is a multiple of 8.
            load_codes(cm + e, n, true, c);
            const float scale_m = sm[block];
#pragma unroll
            for (int k = 0; k < ST_ITEMS; ++k) m[k] = rn_mul(qsigned[c[k]], scale_m);
            load_codes(cv + e, n, true, c);
            const float scale_v = sv[block];
#pragma unroll
            for (int k = 0; k < ST_ITEMS; ++k) v[k] = rn_mul(qunsigned[c[k]], scale_v);
            if (amsgrad) {
                load_codes(cvm + e, n, true, c);
                const float scale_vm = svm[block];
#pragma unroll
                for (int k = 0; k < ST_ITEMS; ++k) vm[k] = rn_mul(qunsigned[c[k]], scale_vm);
            }
        } else {
            pm = field_ptr<S>(page, seg, 0);
            pv = field_ptr<S>(page, seg, 1);
            if (amsgrad) pvm = field_ptr<S>(page, seg, 2);
            vec = vec && aligned16(pm) && aligned16(pv) && aligned16(pvm);
            load_items(pm + e, n, vec, m);
            load_items(pv + e, n, vec, v);
            if (amsgrad) load_items(pvm + e, n, vec, vm);
        }
        load_items(grad + e, n, vec, g);
        if (master) load_items(master + e, n, vec, th); else load_items(param + e, n, vec, th);

#pragma unroll
        for (int k = 0; k < ST_ITEMS; ++k) {
            const float gk = grad_value(g[k], t, false);
            th[k] = rn_sub(th[k], rn_mul(th[k], lr_wd));
            m[k] = lerp_rounded(m[k], gk, w1, second1);
            v[k] = lerp_rounded(v[k], rn_mul(gk, gk), w2, second2);
            float second = v[k];
            if (amsgrad) { vm[k] = nan_max(vm[k], v[k]); second = vm[k]; }
            const float denom = rn_add(rn_div(rn_sqrt(second), bc2_sqrt), eps);
            th[k] = rn_sub(th[k], rn_div(rn_mul(rn_div(m[k], bc1), lr), denom));
        }

        if (quantized) {
            unsigned int c[ST_ITEMS];
            const float new_m = requantize(qsigned, m, n, c);
            if (n > 0) store_codes(cm + e, n, true, c);
            const float new_v = requantize(qunsigned, v, n, c);
            if (n > 0) store_codes(cv + e, n, true, c);
            float new_vm = 0.0f;
            if (amsgrad) {
                new_vm = requantize(qunsigned, vm, n, c);
                if (n > 0) store_codes(cvm + e, n, true, c);
            }
            // Every lane of the warp read the old scale above; lane 0 replaces it once.
            if (lane == 0 && n > 0) {
                sm[block] = new_m;
                sv[block] = new_v;
                if (amsgrad) svm[block] = new_vm;
            }
        } else if (n > 0) {
            store_items(pm + e, n, vec, m);
            store_items(pv + e, n, vec, v);
            if (amsgrad) store_items(pvm + e, n, vec, vm);
        }
        if (n > 0) {
            if (master) store_items(master + e, n, vec, th);
            store_items(param + e, n, vec, th);
        }
    });
}
