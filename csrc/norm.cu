// RMSNorm and fused residual add + RMSNorm, float32 statistics. One block per token row.
#include "common.cuh"

// out[t] = w * x[t] / sqrt(mean(x[t]^2) + eps)          x, out: [T, H] bf16; w: [H] bf16
extern "C" __global__ void rms_norm(const bf16_t* __restrict__ x, const bf16_t* __restrict__ w,
                                    bf16_t* __restrict__ out, int H, float eps) {
  pdl_start();
  __shared__ float scratch[32];
  const long long row = (long long)blockIdx.x * H;
  float ss = 0.0f;
  for (int i = threadIdx.x; i < H; i += blockDim.x) {
    float v = bf2f(x[row + i]);
    ss += v * v;
  }
  const float inv = rsqrtf(block_sum(ss, scratch) / (float)H + eps);
  for (int i = threadIdx.x; i < H; i += blockDim.x)
    out[row + i] = f2bf(bf2f(w[i]) * (bf2f(x[row + i]) * inv));
}

// res_out = x + residual (float32, the residual stream); out = rms_norm(res_out) in bf16.
// x: [T, H] bf16, or float32 when x_f32; residual: [T, H] bf16, or float32 when res_f32.
extern "C" __global__ void add_rms_norm(const void* __restrict__ x, int x_f32,
                                        const void* __restrict__ residual, int res_f32,
                                        const bf16_t* __restrict__ w, bf16_t* __restrict__ out,
                                        float* __restrict__ res_out, int H, float eps) {
  pdl_start();
  __shared__ float scratch[32];
  const long long row = (long long)blockIdx.x * H;
  float ss = 0.0f;
  for (int i = threadIdx.x; i < H; i += blockDim.x) {
    const long long j = row + i;
    float a = x_f32 ? ((const float*)x)[j] : bf2f(((const bf16_t*)x)[j]);
    float r = res_f32 ? ((const float*)residual)[j] : bf2f(((const bf16_t*)residual)[j]);
    float v = a + r;
    res_out[j] = v;
    ss += v * v;
  }
  const float inv = rsqrtf(block_sum(ss, scratch) / (float)H + eps);
  // each thread reads back only the elements it wrote itself
  for (int i = threadIdx.x; i < H; i += blockDim.x)
    out[row + i] = f2bf(bf2f(w[i]) * (res_out[row + i] * inv));
}
