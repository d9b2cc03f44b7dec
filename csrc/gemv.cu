// Dense linears at decode sizes: y = x . W^T for up to 32 tokens, every weight byte read once
// (the inner loop is weight_stream.cuh's).
#include "weight_stream.cuh"

// -- dense ---------------------------------------------------------------------------------

// out[t, n] = x[t] . W[n] for t < T <= 8 * NT. x: [T, K] bf16, row stride ldx; W: [N, K] bf16;
// out: [T, N], float32 if out_f32 else bf16. Grid ceil(N / 16): a block owns 16 rows; its warps
// split K into ranges of `spw` k-steps and add their partials in a fixed order.
// Dynamic shared memory: warps * 16 * 8 * NT floats.
template <int NT, int U>
__device__ __forceinline__ void gemv(const bf16_t* __restrict__ x, long long ldx,
                                     const bf16_t* __restrict__ W, void* __restrict__ out,
                                     int out_f32, int T, int N, int K, int spw) {
  extern __shared__ float part[];  // [warps][16][8 * NT]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int g = lane >> 2, q = lane & 3, n0 = blockIdx.x * 16;
  const int s0 = warp * spw, s1 = min((K + 31) >> 5, s0 + spw);
  // rows past N and tokens past T read row N - 1 and token 0; their sums are dropped
  const bf16_t* const lo[1] = {W + (long long)min(n0 + g, N - 1) * K + 8 * q};
  const bf16_t* const hi[1] = {W + (long long)min(n0 + g + 8, N - 1) * K + 8 * q};
  const bf16_t* xr[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) xr[j] = x + (8 * j + g < T ? 8 * j + g : 0) * ldx + 8 * q;
  float acc[1][NT][4] = {};
  stream_k<1, NT, U, true>(acc, lo, hi, xr, s0, s1, K);  // pdl_start() after the first weights
  store_part<NT>(part + warp * 16 * 8 * NT, acc[0]);
  __syncthreads();
  for (int i = threadIdx.x; i < 16 * T; i += blockDim.x) {
    const int t = i >> 4, r = i & 15;  // neighbouring threads write neighbouring columns
    if (n0 + r >= N) continue;
    float s = 0.0f;
    for (int v = 0; v < warps; ++v) s += part[(v * 16 + r) * 8 * NT + t];
    const long long o = (long long)t * N + n0 + r;
    if (out_f32)
      ((float*)out)[o] = s;
    else
      ((bf16_t*)out)[o] = f2bf(s);
  }
}

#define GEMV_ENTRY(NT, U)                                                                          \
  extern "C" __global__ void __launch_bounds__(512, 1)                                             \
      gemv_nt##NT(const bf16_t* __restrict__ x, long long ldx, const bf16_t* __restrict__ W,       \
                  void* __restrict__ out, int out_f32, int T, int N, int K, int spw) {             \
    gemv<NT, U>(x, ldx, W, out, out_f32, T, N, K, spw);                                            \
  }
GEMV_ENTRY(1, 4)
GEMV_ENTRY(2, 4)
GEMV_ENTRY(3, 2)
GEMV_ENTRY(4, 2)
