// Dense linears at decode sizes: y = x . W^T for up to 32 tokens, every weight byte read once
// (the inner loop is weight_stream.cuh's).
#include "weight_stream.cuh"

// -- dense ---------------------------------------------------------------------------------

// The block's part of x . W^T: part[warp][r][t] for its 16 rows r and the tokens, summed over
// warps by the caller after the barrier this ends with. Rows past N and tokens past T read row
// N - 1 and token 0; their sums are dropped.
template <int NT, int U>
__device__ __forceinline__ void gemv_part(float* part, const bf16_t* __restrict__ x, long long ldx,
                                          const bf16_t* __restrict__ W, int T, int N, int K,
                                          int spw) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, q = lane & 3, n0 = blockIdx.x * 16;
  const int s0 = warp * spw, s1 = min((K + 31) >> 5, s0 + spw);
  const bf16_t* const lo[1] = {W + (long long)min(n0 + g, N - 1) * K + 8 * q};
  const bf16_t* const hi[1] = {W + (long long)min(n0 + g + 8, N - 1) * K + 8 * q};
  const bf16_t* xr[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) xr[j] = x + (8 * j + g < T ? 8 * j + g : 0) * ldx + 8 * q;
  float acc[1][NT][4] = {};
  stream_k<1, NT, U, true>(acc, lo, hi, xr, s0, s1, K);  // pdl_start() after the first weights
  store_part<NT>(part + warp * 16 * 8 * NT, acc[0]);
  __syncthreads();
}

// Row r of token t summed over the block's warps, in a fixed order.
template <int NT>
__device__ __forceinline__ float part_sum(const float* part, int r, int t) {
  float s = 0.0f;
  for (int v = 0; v < (int)(blockDim.x >> 5); ++v) s += part[(v * 16 + r) * 8 * NT + t];
  return s;
}

// out[t, n] = x[t] . W[n] for t < T <= 8 * NT. x: [T, K] bf16, row stride ldx; W: [N, K] bf16;
// out: [T, N], float32 if out_f32 else bf16. Grid ceil(N / 16): a block owns 16 rows; its warps
// split K into ranges of `spw` k-steps and add their partials in a fixed order.
// Dynamic shared memory (here and below): warps * 16 * 8 * NT floats.
template <int NT, int U>
__device__ __forceinline__ void gemv(const bf16_t* __restrict__ x, long long ldx,
                                     const bf16_t* __restrict__ W, void* __restrict__ out,
                                     int out_f32, int T, int N, int K, int spw) {
  extern __shared__ float part[];  // [warps][16][8 * NT]
  gemv_part<NT, U>(part, x, ldx, W, T, N, K, spw);
  const int n0 = blockIdx.x * 16;
  for (int i = threadIdx.x; i < 16 * T; i += blockDim.x) {
    const int t = i >> 4, r = i & 15;  // neighbouring threads write neighbouring columns
    if (n0 + r >= N) continue;
    const float s = part_sum<NT>(part, r, t);
    const long long o = (long long)t * N + n0 + r;
    if (out_f32)
      ((float*)out)[o] = s;
    else
      ((bf16_t*)out)[o] = f2bf(s);
  }
}

// The qkv projection with rope_qkv_write_kv (rope_kv.cu) as its epilogue, rounding as the two
// would: each output rounded to bf16, then q and k rotated in float32 (pairs 2i, 2i+1 of a head
// lie in one block, as D is a multiple of 16), q to q_out [T, heads, D], k and v to kv at the
// token's slot (negative: padding, nothing written). W: [(heads + 2 kv_heads) D, K]; pos, slots:
// [T] int64; inv_freq: [D / 2] float32; kv: one layer, its halves kv_half elements apart.
template <int NT, int U>
__device__ __forceinline__ void gemv_rope_kv(const bf16_t* __restrict__ x, long long ldx,
                                             const bf16_t* __restrict__ W, int T, int K, int spw,
                                             const long long* __restrict__ pos,
                                             const float* __restrict__ inv_freq,
                                             bf16_t* __restrict__ q_out,
                                             const long long* __restrict__ slots,
                                             bf16_t* __restrict__ kv, long long kv_half,
                                             int heads, int kv_heads, int D) {
  extern __shared__ float part[];  // [warps][16][8 * NT]
  const int N = (heads + 2 * kv_heads) * D;
  gemv_part<NT, U>(part, x, ldx, W, T, N, K, spw);
  const int n0 = blockIdx.x * 16, h = n0 / D;  // the block's head: q, then k, then v heads
  for (int i = threadIdx.x; i < 8 * T; i += blockDim.x) {
    const int t = i >> 3, r = 2 * (i & 7), d = n0 + r - h * D;
    const float a = bf2f(f2bf(part_sum<NT>(part, r, t)));
    const float b = bf2f(f2bf(part_sum<NT>(part, r + 1, t)));
    const long long slot = slots[t];
    bf16_t* dst;
    if (h < heads)
      dst = q_out + ((long long)t * heads + h) * D + d;
    else if (slot < 0)
      continue;
    else if (h < heads + kv_heads)
      dst = kv + (slot * kv_heads + h - heads) * D + d;
    else
      dst = kv + kv_half + (slot * kv_heads + h - heads - kv_heads) * D + d;
    if (h < heads + kv_heads) {
      store_rotated(dst, a, b, (float)pos[t] * inv_freq[d >> 1]);
    } else {
      dst[0] = f2bf(a);
      dst[1] = f2bf(b);
    }
  }
}

#define GEMV_ENTRY(NT, U)                                                                          \
  extern "C" __global__ void __launch_bounds__(512, 1)                                             \
      gemv_nt##NT(const bf16_t* __restrict__ x, long long ldx, const bf16_t* __restrict__ W,       \
                  void* __restrict__ out, int out_f32, int T, int N, int K, int spw) {             \
    gemv<NT, U>(x, ldx, W, out, out_f32, T, N, K, spw);                                            \
  }
#define GEMV_ROPE_KV_ENTRY(NT, U)                                                                  \
  extern "C" __global__ void __launch_bounds__(512, 1) gemv_rope_kv_nt##NT(                        \
      const bf16_t* __restrict__ x, long long ldx, const bf16_t* __restrict__ W, int T, int K,     \
      int spw, const long long* __restrict__ pos, const float* __restrict__ inv_freq,              \
      bf16_t* __restrict__ q_out, const long long* __restrict__ slots, bf16_t* __restrict__ kv,    \
      long long kv_half, int heads, int kv_heads, int D) {                                         \
    gemv_rope_kv<NT, U>(x, ldx, W, T, K, spw, pos, inv_freq, q_out, slots, kv, kv_half, heads,     \
                        kv_heads, D);                                                              \
  }
GEMV_ENTRY(1, 4)
GEMV_ENTRY(2, 4)
GEMV_ENTRY(3, 2)
GEMV_ENTRY(4, 2)
GEMV_ROPE_KV_ENTRY(1, 4)
