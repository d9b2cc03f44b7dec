// The data movement around cuBLAS in the prefill MoE (pdserve/backends/cupy_moe_prefill.py and
// cupy_route_prefill.py): bf16 -> float32 for the router's float32 GEMM, counting the pairs by
// expert, the gather of token rows into each expert's padded rows, SiLU-mul, and the weighted
// combine. All memory-bound: 16-byte loads and stores where rows are multiples of 8 elements
// (the models' shapes), element by element otherwise.
#include "common.cuh"

// two floats -> one word of two bf16 (the first at the lower address)
__device__ __forceinline__ u32 pack_bf(float lo, float hi) {
  return (u32)f2bf(lo) | ((u32)f2bf(hi) << 16);
}

// silu(gate) * up of two bf16 pairs, packed as two bf16
__device__ __forceinline__ u32 silu_mul2(u32 gate, u32 up) {
  return pack_bf(silu(lo_bf(gate)) * lo_bf(up), silu(hi_bf(gate)) * hi_bf(up));
}

// y[i] = x[i], exactly: x [n] bf16 -> y [n] float32 (both 16-byte aligned). Grid-stride.
extern "C" __global__ void bf16_to_f32(const bf16_t* __restrict__ x, float* __restrict__ y,
                                       long long n) {
  pdl_start();
  const long long stride = (long long)gridDim.x * blockDim.x;
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if ((n & 7) == 0) {
    for (; i < (n >> 3); i += stride) {
      const u32x4 v = ((const u32x4*)x)[i];
      ((u32x4*)y)[2 * i] = u32x4{v.x << 16, v.x & 0xffff0000u, v.y << 16, v.y & 0xffff0000u};
      ((u32x4*)y)[2 * i + 1] = u32x4{v.z << 16, v.z & 0xffff0000u, v.w << 16, v.w & 0xffff0000u};
    }
  } else {
    for (; i < n; i += stride) y[i] = bf2f(x[i]);
  }
}

// rank[p] = the number of pairs before p that picked expert ids[p] (in an order that varies from
// run to run; no result depends on it) and counts[e] += the pairs that picked e, counts starting
// at zero. ids, rank: [P] int32; counts: [E] int32. Grid-stride, a thread a pair: one global
// atomic a pair (moe.cu's moe_group does this in one block, 77 us for 49152 pairs).
extern "C" __global__ void moe_count_pairs(const int* __restrict__ ids, int* __restrict__ counts,
                                           int* __restrict__ rank, int P) {
  pdl_start();
  for (int p = blockIdx.x * blockDim.x + threadIdx.x; p < P; p += gridDim.x * blockDim.x)
    rank[p] = atomicAdd(&counts[ids[p]], 1);
}

// xs[r] = x[p / K] and pos[p] = r, r = base[ids[p]] + rank[p], for each pair p (p = token * K +
// k): every expert's pairs land in its own rows from base[e] on. Rows no pair lands in (padding)
// keep whatever they held: a GEMM's output row depends on its input row alone, and nothing reads
// the padding's. x: [T, H] bf16; ids, rank, pos: [P] int32; base: [E] int32; xs: [R, H] bf16.
// Grid ceil(P / 8), 256 threads: a warp a pair.
extern "C" __global__ void __launch_bounds__(256)
    moe_scatter_rows(const bf16_t* __restrict__ x, const int* __restrict__ ids,
                     const int* __restrict__ rank, const int* __restrict__ base,
                     bf16_t* __restrict__ xs, int* __restrict__ pos, int P, int H, int K) {
  pdl_start();
  const int lane = threadIdx.x & 31, p = blockIdx.x * 8 + (threadIdx.x >> 5);
  if (p >= P) return;
  const int r = base[ids[p]] + rank[p];
  if (lane == 0) pos[p] = r;
  const bf16_t* src = x + (long long)(p / K) * H;
  bf16_t* dst = xs + (long long)r * H;
  if ((H & 7) == 0) {
    for (int v = lane; v < (H >> 3); v += 32) ((u32x4*)dst)[v] = ((const u32x4*)src)[v];
  } else {
    for (int h = lane; h < H; h += 32) dst[h] = src[h];
  }
}

// act[r, j] = silu(gu[r, j]) * gu[r, I + j]. gu: [R, 2I] bf16; act: [R, I] bf16. Grid R, one
// block a row (no division per element, unlike elementwise.cu's silu_mul).
extern "C" __global__ void silu_mul_rows(const bf16_t* __restrict__ gu,
                                         bf16_t* __restrict__ act, int I) {
  pdl_start();
  const bf16_t* g = gu + (long long)blockIdx.x * 2 * I;
  bf16_t* a = act + (long long)blockIdx.x * I;
  if ((I & 7) == 0) {
    for (int v = threadIdx.x; v < (I >> 3); v += blockDim.x) {
      const u32x4 x = ((const u32x4*)g)[v], u = ((const u32x4*)(g + I))[v];
      ((u32x4*)a)[v] = u32x4{silu_mul2(x.x, u.x), silu_mul2(x.y, u.y), silu_mul2(x.z, u.z),
                             silu_mul2(x.w, u.w)};
    }
  } else {
    for (int j = threadIdx.x; j < I; j += blockDim.x)
      a[j] = f2bf(silu(bf2f(g[j])) * bf2f(g[I + j]));
  }
}

// out[t] = sum_k w[t, k] * y[pos[t * K + k]] (+ addend[t] unless null) in float32, k in order.
// y: [R, H] bf16 (padded rows); pos: [T * K] int32; w: [T, K] float32; addend, out: [T, H] bf16.
// Grid T, one block a token.
extern "C" __global__ void moe_chunk_combine(const bf16_t* __restrict__ y,
                                             const int* __restrict__ pos,
                                             const float* __restrict__ w,
                                             const bf16_t* __restrict__ addend,
                                             bf16_t* __restrict__ out, int H, int K) {
  pdl_start();
  const long long t = blockIdx.x;
  if ((H & 7) == 0) {
    for (int v = threadIdx.x; v < (H >> 3); v += blockDim.x) {
      float s[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
      for (int k = 0; k < K; ++k) {
        const float wk = w[t * K + k];
        const u32x4 a = ((const u32x4*)(y + (long long)pos[t * K + k] * H))[v];
        s[0] += wk * lo_bf(a.x);
        s[1] += wk * hi_bf(a.x);
        s[2] += wk * lo_bf(a.y);
        s[3] += wk * hi_bf(a.y);
        s[4] += wk * lo_bf(a.z);
        s[5] += wk * hi_bf(a.z);
        s[6] += wk * lo_bf(a.w);
        s[7] += wk * hi_bf(a.w);
      }
      if (addend) {
        const u32x4 a = ((const u32x4*)(addend + t * H))[v];
        s[0] += lo_bf(a.x);
        s[1] += hi_bf(a.x);
        s[2] += lo_bf(a.y);
        s[3] += hi_bf(a.y);
        s[4] += lo_bf(a.z);
        s[5] += hi_bf(a.z);
        s[6] += lo_bf(a.w);
        s[7] += hi_bf(a.w);
      }
      ((u32x4*)(out + t * H))[v] = u32x4{pack_bf(s[0], s[1]), pack_bf(s[2], s[3]),
                                         pack_bf(s[4], s[5]), pack_bf(s[6], s[7])};
    }
  } else {
    for (int j = threadIdx.x; j < H; j += blockDim.x) {
      float s = 0.0f;
      for (int k = 0; k < K; ++k)
        s += w[t * K + k] * bf2f(y[(long long)pos[t * K + k] * H + j]);
      if (addend) s += bf2f(addend[t * H + j]);
      out[t * H + j] = f2bf(s);
    }
  }
}
