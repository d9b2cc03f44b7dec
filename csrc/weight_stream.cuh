// The inner loop of the weight-streaming kernels for decode, y = x . W^T where x has few rows
// (tokens), so the time is the time to read W once: dense linears (gemv.cu) and the experts of a
// MoE layer (moe_decode.cu).
//
// The inner loop puts the weights on the tensor cores as the A operand of mma.m16n8k16 (16
// weight rows) and up to 8 tokens as B, float32 accumulation. A dot product may visit k in any
// order as long as both operands agree, so each lane loads 16 contiguous bytes of a weight row
// straight from global memory into the fragment: lane (g = lane / 4, q = lane % 4) reads
// k = 32s + 8q .. 8q + 7 of rows g and g + 8, and the same 8 k of token g. Fragment k 2q, 2q+1,
// 2q+8, 2q+9 of the first mma are physical 8q + 0..3, those of the second 8q + 4..7. So weights
// need no shared memory, every weight byte is read once whatever the number of tokens, and the
// FLOPs (which at 16+ tokens would swamp the CUDA cores) cost next to nothing.
//
// Requirements (the Python side checks them): K % 8 == 0, W and x rows 16-byte aligned.
#ifndef PDSERVE_WEIGHT_STREAM_CUH
#define PDSERVE_WEIGHT_STREAM_CUH
#include "common.cuh"

// 16 weight bytes, read once: bypass L1 so the activations that every warp re-reads stay there.
// With PDSERVE_EVICT_FIRST, also ask L2 to evict the line first, so that streaming a layer's
// experts does not push out the weights csrc/prefetch.cu brought in for the launches after it
// (no effect on whole decode steps measured so far: benchmarks/RESULTS.md, session 7). (Asking
// L2 for 256-byte fetches, .L2::256B, sped one MoE layer up 6% in bench_decode_kernels.py but
// left whole decode steps as fast at batch 32 and 3% slower at 1 and 8, measured in one run on
// the H200: not used.)
#ifndef PDSERVE_EVICT_FIRST  // NVRTC builds get it from cupy_kernels.EVICT_FIRST
#define PDSERVE_EVICT_FIRST 0
#endif
__device__ __forceinline__ u32x4 ld_weight(const bf16_t* p) {
  u32x4 v;
#if PDSERVE_EVICT_FIRST
  unsigned long long policy;  // not volatile: the compiler may hoist it out of the loops
  asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  asm("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p), "l"(policy));
#else
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
#endif
  return v;
}

// 16 bytes at p where ok, else zero (the address is not touched then); for partial k-steps.
__device__ __forceinline__ u32x4 ld_or_zero(const bf16_t* p, bool ok) {
  u32x4 v;
  asm("{\n .reg .pred p;\n setp.ne.b32 p, %5, 0;\n"
      " mov.b32 %0, 0;\n mov.b32 %1, 0;\n mov.b32 %2, 0;\n mov.b32 %3, 0;\n"
      " @p ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];\n}"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p), "r"((int)ok));
  return v;
}

// d += W[16 rows, 32 k] . X[8 tokens, 32 k]^T as two m16n8k16: a = rows g (lo) and g + 8 (hi).
__device__ __forceinline__ void mma_k32(float* d, const u32x4& lo, const u32x4& hi,
                                        const u32x4& x) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(lo.x), "r"(hi.x), "r"(lo.y), "r"(hi.y), "r"(x.x), "r"(x.y));
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(lo.z), "r"(hi.z), "r"(lo.w), "r"(hi.w), "r"(x.z), "r"(x.w));
}

template <int NW, int U>
struct WeightFrags {  // U k-steps of NW weight tiles: rows g (lo) and g + 8 (hi)
  u32x4 lo[U][NW], hi[U][NW];
};

template <int NW, int U>
__device__ __forceinline__ void load_weights(WeightFrags<NW, U>& f, const bf16_t* const (&lo)[NW],
                                             const bf16_t* const (&hi)[NW], int k) {
#pragma unroll
  for (int u = 0; u < U; ++u)
#pragma unroll
    for (int i = 0; i < NW; ++i) {
      f.lo[u][i] = ld_weight(lo[i] + k + 32 * u);
      f.hi[u][i] = ld_weight(hi[i] + k + 32 * u);
    }
}

// The tokens' fragments are loaded where they are used: they come from L1.
template <int NW, int NT, int U>
__device__ __forceinline__ void mma_weights(float (&acc)[NW][NT][4], const WeightFrags<NW, U>& f,
                                            const bf16_t* const (&x)[NT], int k) {
#pragma unroll
  for (int u = 0; u < U; ++u)
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const u32x4 xv = *(const u32x4*)(x[j] + k + 32 * u);
#pragma unroll
      for (int i = 0; i < NW; ++i) mma_k32(acc[i][j], f.lo[u][i], f.hi[u][i], xv);
    }
}

// acc[w][j] += W_w[16 rows] . X_j[8 tokens]^T over k-steps [s0, s1) of 32, for NW weight tiles
// that share the tokens (gate and up) and NT token tiles. lo[i] / hi[i] point at this lane's
// rows g / g + 8 of tile i plus 8q, x[j] at its token row plus 8q; all must be valid rows
// (callers clamp them and drop what clamped rows give). Whole groups of U steps are
// double-buffered in registers, so each warp has U steps of weights in flight while it
// multiplies the previous U (left to itself, ptxas sinks every load to just before its mma,
// which leaves one step in flight). The last, partial steps go one at a time. With WAIT, the
// first group of weights is loaded before pdl_start(): weights are never written, so they can
// stream in while the kernel before this one finishes.
template <int NW, int NT, int U, bool WAIT = false>
__device__ __forceinline__ void stream_k(float (&acc)[NW][NT][4], const bf16_t* const (&lo)[NW],
                                         const bf16_t* const (&hi)[NW],
                                         const bf16_t* const (&x)[NT], int s0, int s1, int K) {
  const int groups = max(0, (min(s1, K >> 5) - s0) / U);
  int s = s0;
  if (groups > 0) {
    WeightFrags<NW, U> cur;
    load_weights(cur, lo, hi, s0 * 32);
    if (WAIT) pdl_start();
#pragma unroll 1
    for (int gi = 1; gi <= groups; ++gi) {
      WeightFrags<NW, U> next;
      const bool more = gi < groups;
      if (more) load_weights(next, lo, hi, (s0 + gi * U) * 32);
      mma_weights(acc, cur, x, (s0 + (gi - 1) * U) * 32);
      if (more) cur = next;
    }
    s += groups * U;
  } else if (WAIT) {
    pdl_start();
  }
  const int q = threadIdx.x & 3;
#pragma unroll 1
  for (; s < s1; ++s) {
    const int k = s * 32;
    const bool ok = k + 8 * q < K;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const u32x4 xv = ld_or_zero(x[j] + k, ok);
#pragma unroll
      for (int i = 0; i < NW; ++i)
        mma_k32(acc[i][j], ld_or_zero(lo[i] + k, ok), ld_or_zero(hi[i] + k, ok), xv);
    }
  }
}

// Spreads a warp's accumulators into part[row][token] (16 rows, 8 * NT tokens): the mma's C
// fragment holds rows g, g + 8 and tokens 2q, 2q + 1 of each token tile.
template <int NT>
__device__ __forceinline__ void store_part(float* part, const float (&acc)[NT][4]) {
  const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i)
      part[(g + 8 * (i >> 1)) * 8 * NT + 8 * j + 2 * q + (i & 1)] = acc[j][i];
}

#endif  // PDSERVE_WEIGHT_STREAM_CUH
