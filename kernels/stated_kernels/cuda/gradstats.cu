// Gradient statistics for the daemon's pre-pass (Note [gradient checks] in stated/backends/base.py):
// per tensor, the float64 sum of squares of (g * inv_scale) and the count of non-finite gradients.
// The global norm for clipping is sqrt of the sum over tensors; any non-finite count skips the step.
//
// Deterministic: each block sums a fixed part of one tensor into its own slot, then one block per
// tensor adds its slots in a fixed tree order, so the result depends on the grid and the data only.
//
//   stated_gradstats_partial<P>(ids, nids, tensors, grad_arena, inv_scale, part_sumsq, part_nonfinite)
//       grid (x, nids), 256 threads, any x. Block (b, y) reads tensor ids[y]: elements in groups of
//       8 consecutive ones, group k for k = b, b + x, b + 2x, ...; writes part_*[y * x + b].
//   stated_gradstats_finish<P>(nparts, part_sumsq, part_nonfinite, sumsq, nonfinite)
//       grid (1, nids), 256 threads: sumsq[y] = sum of part_sumsq[y * nparts ...], nparts = the x
//       above; likewise nonfinite.
//
// Outputs are indexed by position in `ids`, not by tensor row. Each value is decoded from P, taken
// to float64, multiplied by (double)inv_scale and squared in float64; a value is non-finite when the
// gradient itself is inf or nan (its square then makes the sum non-finite too). The kernels read
// only `grad` and `numel` of a tensor row, and P only (they are templates on the gradient type
// alone: no state is read).

#include "stated_common.cuh"

using namespace stated;

namespace {

__device__ __forceinline__ unsigned int warp_sum_u(unsigned int x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// Block sums of a (double, count) pair, written by thread 0.
__device__ __forceinline__ void block_store(double s, unsigned int c, double* sum_out, unsigned int* count_out) {
    __shared__ double ss[ST_WARPS];
    __shared__ unsigned int cs[ST_WARPS];
    s = warp_sum(s);
    c = warp_sum_u(c);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) { ss[warp] = s; cs[warp] = c; }
    __syncthreads();
    if (warp == 0) {
        s = lane < ST_WARPS ? ss[lane] : 0.0;
        c = lane < ST_WARPS ? cs[lane] : 0u;
        s = warp_sum(s);
        c = warp_sum_u(c);
        if (lane == 0) { *sum_out = s; *count_out = c; }
    }
}

}  // namespace

template <typename P>
__global__ void __launch_bounds__(ST_THREADS)
stated_gradstats_partial(const int* __restrict__ ids, int nids, const StTensor* __restrict__ tensors,
                         const P* __restrict__ grad_arena, float inv_scale, double* __restrict__ part_sumsq,
                         unsigned int* __restrict__ part_nonfinite) {
    const StTensor& t = tensors[ids[blockIdx.y]];
    const P* g = grad_arena + t.grad;
    const bool vec = aligned16(g);
    const double scale = (double)inv_scale;
    double sum = 0.0;
    unsigned int bad = 0;
    const long long groups = (t.numel + ST_ITEMS - 1) / ST_ITEMS;
    for (long long k = (long long)blockIdx.x * ST_THREADS + threadIdx.x; k < groups;
         k += (long long)gridDim.x * ST_THREADS) {
        const long long e0 = k * ST_ITEMS;
        const long long left = t.numel - e0;
        const int n = left >= ST_ITEMS ? ST_ITEMS : (int)left;
        float x[ST_ITEMS];
        load_items(g + e0, n, vec, x);
#pragma unroll
        for (int i = 0; i < ST_ITEMS; ++i) {
            if (i < n) {
                if (!isfinite(x[i])) ++bad;
                const double y = (double)x[i] * scale;
                sum += y * y;
            }
        }
    }
    const long long slot = (long long)blockIdx.y * gridDim.x + blockIdx.x;
    block_store(sum, bad, &part_sumsq[slot], &part_nonfinite[slot]);
}

template <typename P>
__global__ void __launch_bounds__(ST_THREADS)
stated_gradstats_finish(int nparts, const double* __restrict__ part_sumsq,
                        const unsigned int* __restrict__ part_nonfinite, double* __restrict__ sumsq,
                        unsigned int* __restrict__ nonfinite) {
    const long long base = (long long)blockIdx.y * nparts;
    double sum = 0.0;
    unsigned int bad = 0;
    for (int k = threadIdx.x; k < nparts; k += ST_THREADS) {
        sum += part_sumsq[base + k];
        bad += part_nonfinite[base + k];
    }
    block_store(sum, bad, &sumsq[blockIdx.y], &nonfinite[blockIdx.y]);
}
