// The weighted combine of the prefill MoE path (pdserve/backends/cupy_moe_prefill.py), whose
// expert outputs sit in rows sorted by expert.
#include "common.cuh"

// out[t] = sum_k w[t, k] * y[pos[t * K + k]], in float32, k in order.
// y: [P, H] bf16, P = T * K rows sorted by expert; pos: [P] int32, the sorted row of each
// (token, k) pair; w: [T, K] float32; out: [T, H] bf16. One block per token.
extern "C" __global__ void moe_combine_sorted(const bf16_t* __restrict__ y,
                                              const int* __restrict__ pos,
                                              const float* __restrict__ w,
                                              bf16_t* __restrict__ out, int H, int K) {
  pdl_start();
  const int t = blockIdx.x;
  for (int j = threadIdx.x; j < H; j += blockDim.x) {
    float s = 0.0f;
    for (int k = 0; k < K; ++k) s += w[t * K + k] * bf2f(y[(long long)pos[t * K + k] * H + j]);
    out[(long long)t * H + j] = f2bf(s);
  }
}
