// Greedy sampling on the device: the argmax of each logits row and its log-probability, so a
// step moves two numbers per sequence to the host instead of the whole vocabulary.
#include "common.cuh"

// logits: [B, V] float32 with row stride `ld`; ids: [B] int64; logprobs: [B] float32.
// ids[b] = the lowest index of the row's maximum (NumPy's argmax), logprobs[b] = that logit
// minus logsumexp of the row. One block per row, blockDim.x a multiple of 32.
extern "C" __global__ void greedy_sample(const float* __restrict__ logits, long long ld, int V,
                                         long long* __restrict__ ids,
                                         float* __restrict__ logprobs) {
  pdl_start();
  __shared__ float s_val[32];
  __shared__ int s_idx[32];
  __shared__ float scratch[32];
  const float* x = logits + (long long)blockIdx.x * ld;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  float best = NEG_INF;
  int best_i = V;
  for (int i = threadIdx.x; i < V; i += blockDim.x) {
    const float v = x[i];
    if (v > best) best = v, best_i = i;  // strided scan: a later i only wins when larger
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float v = __shfl_xor_sync(0xffffffffu, best, o);
    const int j = __shfl_xor_sync(0xffffffffu, best_i, o);
    if (v > best || (v == best && j < best_i)) best = v, best_i = j;
  }
  if (lane == 0) s_val[warp] = best, s_idx[warp] = best_i;
  __syncthreads();
  best = lane < warps ? s_val[lane] : NEG_INF;
  best_i = lane < warps ? s_idx[lane] : V;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float v = __shfl_xor_sync(0xffffffffu, best, o);
    const int j = __shfl_xor_sync(0xffffffffu, best_i, o);
    if (v > best || (v == best && j < best_i)) best = v, best_i = j;
  }
  float sum = 0.0f;
  for (int i = threadIdx.x; i < V; i += blockDim.x) sum += expf(x[i] - best);
  sum = block_sum(sum, scratch);
  if (threadIdx.x == 0) {
    ids[blockIdx.x] = best_i;
    logprobs[blockIdx.x] = -logf(sum);  // x[best_i] - (best + log(sum))
  }
}
