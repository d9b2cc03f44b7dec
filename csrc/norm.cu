// RMSNorm and fused residual add + RMSNorm, float32 statistics. One block per token row; each
// thread keeps its (at most NORM_VALS) elements and their weights in registers, so a row costs
// one round of loads, the block sum and one round of stores.
#include "norm.cuh"

// out[t] = w * x[t] / sqrt(mean(x[t]^2) + eps)          x, out: [T, H] bf16; w: [H] bf16
extern "C" __global__ void rms_norm(const bf16_t* __restrict__ x, const bf16_t* __restrict__ w,
                                    bf16_t* __restrict__ out, int H, float eps) {
  pdl_start();
  const long long row = (long long)blockIdx.x * H;
  float v[NORM_VALS], wv[NORM_VALS], ss = 0.0f;
#pragma unroll
  for (int c = 0; c < NORM_VALS; ++c) {
    const int i = threadIdx.x + c * blockDim.x;
    v[c] = i < H ? bf2f(x[row + i]) : 0.0f;
    wv[c] = i < H ? bf2f(w[i]) : 0.0f;
    ss += v[c] * v[c];
  }
  store_normed(v, wv, ss, out, row, H, eps);
}

// res_out = x + residual (float32, the residual stream); out = rms_norm(res_out) in bf16.
// x: [T, H] bf16, or float32 when x_f32; residual: [T, H] bf16, or float32 when res_f32.
extern "C" __global__ void add_rms_norm(const void* __restrict__ x, int x_f32,
                                        const void* __restrict__ residual, int res_f32,
                                        const bf16_t* __restrict__ w, bf16_t* __restrict__ out,
                                        float* __restrict__ res_out, int H, float eps) {
  pdl_start();
  const long long row = (long long)blockIdx.x * H;
  float v[NORM_VALS], wv[NORM_VALS], ss = 0.0f;
#pragma unroll
  for (int c = 0; c < NORM_VALS; ++c) {
    const int i = threadIdx.x + c * blockDim.x;
    v[c] = wv[c] = 0.0f;
    if (i < H) {
      const long long j = row + i;
      const float a = x_f32 ? ((const float*)x)[j] : bf2f(((const bf16_t*)x)[j]);
      const float r = res_f32 ? ((const float*)residual)[j] : bf2f(((const bf16_t*)residual)[j]);
      v[c] = a + r;
      wv[c] = bf2f(w[i]);
      res_out[j] = v[c];
      ss += v[c] * v[c];
    }
  }
  store_normed(v, wv, ss, out, row, H, eps);
}
