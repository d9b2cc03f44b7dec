// RMSNorm's tail, shared by norm.cu and the kernels that end in a norm (moe_decode.cu's
// combine): one block per token row, each thread holding at most NORM_VALS of its elements.
#ifndef PDSERVE_NORM_CUH
#define PDSERVE_NORM_CUH
#include "common.cuh"

#define NORM_VALS 8  // H <= NORM_VALS * blockDim.x (the launch sizes the block so)

// out[row + i] = bf16(wv * v * rsqrt(ss over the block / H + eps)) for this thread's values v
// (element i = threadIdx.x + c * blockDim.x) and weights wv; ss is its share of the squares.
__device__ __forceinline__ void store_normed(const float (&v)[NORM_VALS],
                                             const float (&wv)[NORM_VALS], float ss,
                                             bf16_t* __restrict__ out, long long row, int H,
                                             float eps) {
  __shared__ float scratch[32];
  const float inv = rsqrtf(block_sum(ss, scratch) / (float)H + eps);
#pragma unroll
  for (int c = 0; c < NORM_VALS; ++c) {
    const int i = threadIdx.x + c * blockDim.x;
    if (i < H) out[row + i] = f2bf(wv[c] * (v[c] * inv));
  }
}

#endif  // PDSERVE_NORM_CUH
