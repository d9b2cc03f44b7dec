// Embedding gather and SiLU-mul.
#include "common.cuh"

// out[t] = table[ids[t]]            table: [V, H] bf16; ids: [T] int64; out: [T, H] bf16
extern "C" __global__ void embedding(const bf16_t* __restrict__ table,
                                     const long long* __restrict__ ids, bf16_t* __restrict__ out,
                                     int H) {
  pdl_start();
  const long long src = ids[blockIdx.x] * H, dst = (long long)blockIdx.x * H;
  for (int i = threadIdx.x; i < H; i += blockDim.x) out[dst + i] = table[src + i];
}

// out[t, j] = silu(gu[t, j]) * gu[t, I + j]        gu: [T, 2I] bf16; out: [T, I] bf16
extern "C" __global__ void silu_mul(const bf16_t* __restrict__ gu, bf16_t* __restrict__ out,
                                    int I, long long n) {
  pdl_start();
  for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < n;
       idx += (long long)gridDim.x * blockDim.x) {
    const long long t = idx / I, j = idx - t * I;
    const bf16_t* row = gu + t * 2 * I;
    out[idx] = f2bf(silu(bf2f(row[j])) * bf2f(row[I + j]));
  }
}
