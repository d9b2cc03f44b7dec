// Weight-streaming kernels for decode: y = x . W^T where x has few rows (tokens), so the time is
// the time to read W once. Dense linears (gemv_nt*) and the routed experts of a MoE layer
// (moe_gv_gate_up_nt*, moe_gv_down_nt*, over the expert grouping of moe.cu's moe_group) share
// one inner loop.
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
#include "common.cuh"

// 16 weight bytes, read once: bypass L1 so the activations that every warp re-reads stay there.
__device__ __forceinline__ u32x4 ld_weight(const bf16_t* p) {
  u32x4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
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
// which leaves one step in flight). The last, partial steps go one at a time.
template <int NW, int NT, int U>
__device__ __forceinline__ void stream_k(float (&acc)[NW][NT][4], const bf16_t* const (&lo)[NW],
                                         const bf16_t* const (&hi)[NW],
                                         const bf16_t* const (&x)[NT], int s0, int s1, int K) {
  const int groups = max(0, (min(s1, K >> 5) - s0) / U);
  int s = s0;
  if (groups > 0) {
    WeightFrags<NW, U> cur;
    load_weights(cur, lo, hi, s0 * 32);
#pragma unroll 1
    for (int gi = 1; gi <= groups; ++gi) {
      WeightFrags<NW, U> next;
      const bool more = gi < groups;
      if (more) load_weights(next, lo, hi, (s0 + gi * U) * 32);
      mma_weights(acc, cur, x, (s0 + (gi - 1) * U) * 32);
      if (more) cur = next;
    }
    s += groups * U;
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
  stream_k<1, NT, U>(acc, lo, hi, xr, s0, s1, K);
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

// -- routed experts (decode) ---------------------------------------------------------------
// Slots come from moe_group (moe.cu): slot s < max_slots names expert slot_expert[s] (-1: none,
// and so are all later slots) whose pairs are sorted[slot_start[s] + m], m < slot_count[s];
// pair p is token p / topk. Each touched expert's weights are read once per layer, against all
// of its tokens (in chunks of 8 * NT; a chunk past the first re-reads the expert, which only a
// very skewed routing needs).

// act[pos, j] = silu(gate_e[j] . x[tok]) * up_e[j] . x[tok] for every sorted position pos of
// slot blockIdx.x. x: [T, H] bf16; gate_up: [E, 2I, H] bf16 (gate rows, then up rows); act:
// [P, I] bf16 in sorted order. Grid (max_slots, ceil(I / 16)); the block's warps split H into
// ranges of `spw` k-steps. Dynamic shared memory: warps * 2 * 16 * 8 * NT floats.
template <int NT, int U>
__device__ __forceinline__ void moe_gv_gate_up(
    const bf16_t* __restrict__ x, const int* __restrict__ sorted,
    const int* __restrict__ slot_expert, const int* __restrict__ slot_start,
    const int* __restrict__ slot_count, const bf16_t* __restrict__ gate_up,
    bf16_t* __restrict__ act, int H, int I, int topk, int spw) {
  extern __shared__ float part[];  // [warps][gate, up][16][8 * NT]
  const int e = slot_expert[blockIdx.x];
  if (e < 0) return;  // the whole block: no barrier is skipped by part of it
  const int start = slot_start[blockIdx.x], count = slot_count[blockIdx.x];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int g = lane >> 2, q = lane & 3, j0 = blockIdx.y * 16;
  const int s0 = warp * spw, s1 = min((H + 31) >> 5, s0 + spw);
  // rows past I read row I - 1, positions past count the slot's first pair: dropped below
  const bf16_t* gate = gate_up + (long long)e * 2 * I * H + 8 * q;
  const long long r_lo = (long long)min(j0 + g, I - 1) * H;
  const long long r_hi = (long long)min(j0 + g + 8, I - 1) * H;
  const bf16_t* const lo[2] = {gate + r_lo, gate + (long long)I * H + r_lo};
  const bf16_t* const hi[2] = {gate + r_hi, gate + (long long)I * H + r_hi};
  constexpr int TOK = 8 * NT;
  for (int c0 = 0; c0 < count; c0 += TOK) {
    const bf16_t* xr[NT];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int m = c0 + 8 * j + g;
      xr[j] = x + (long long)(sorted[start + (m < count ? m : 0)] / topk) * H + 8 * q;
    }
    float acc[2][NT][4] = {};
    stream_k<2, NT, U>(acc, lo, hi, xr, s0, s1, H);
    store_part<NT>(part + (warp * 2) * 16 * TOK, acc[0]);
    store_part<NT>(part + (warp * 2 + 1) * 16 * TOK, acc[1]);
    __syncthreads();
    for (int i = threadIdx.x; i < 16 * TOK; i += blockDim.x) {
      const int m = c0 + (i >> 4), r = i & 15;
      if (m >= count || j0 + r >= I) continue;
      float gs = 0.0f, us = 0.0f;
      for (int v = 0; v < warps; ++v) {
        gs += part[((v * 2) * 16 + r) * TOK + (i >> 4)];
        us += part[((v * 2 + 1) * 16 + r) * TOK + (i >> 4)];
      }
      act[(long long)(start + m) * I + j0 + r] = f2bf(silu(gs) * us);
    }
    __syncthreads();  // the next chunk overwrites part
  }
}

// out[t, h] = sum over t's pairs p of weights[p] * down_e[h] . act[pos(p)], e the pair's expert.
// act: [P, I] bf16 in sorted order; weights: [P] f32; down: [E, H, I] bf16; out: [T, H] bf16.
// Grid ceil(H / 16): a block owns 16 rows of every expert, so it sums each token's experts
// itself (no second pass); its warps take the work items (slot, k-part) in turn, k-parts split
// I in `kparts` ranges. Each warp adds into its own [T][16] accumulators, summed in a fixed
// order at the end. Dynamic shared memory: warps * T * 16 floats.
template <int NT, int U>
__device__ __forceinline__ void moe_gv_down(
    const bf16_t* __restrict__ act, const int* __restrict__ sorted,
    const int* __restrict__ slot_expert, const int* __restrict__ slot_start,
    const int* __restrict__ slot_count, const float* __restrict__ weights,
    const bf16_t* __restrict__ down, bf16_t* __restrict__ out, int T, int H, int I, int topk,
    int max_slots, int kparts) {
  extern __shared__ float acc_t[];  // [warps][T][16]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int g = lane >> 2, q = lane & 3, h0 = blockIdx.x * 16;
  float* mine = acc_t + (long long)warp * T * 16;
  for (int i = lane; i < T * 16; i += 32) mine[i] = 0.0f;
  __syncwarp();
  const int ksteps = (I + 31) >> 5, spp = (ksteps + kparts - 1) / kparts;
  constexpr int TOK = 8 * NT;
  for (int item = warp; item < max_slots * kparts; item += warps) {
    const int slot = item / kparts, kp = item - slot * kparts;
    const int e = slot_expert[slot];
    if (e < 0) break;  // later items are of later slots: none of them is used either
    const int start = slot_start[slot], count = slot_count[slot];
    // rows past H read row H - 1, positions past count the slot's first: dropped below
    const bf16_t* w = down + (long long)e * H * I + 8 * q;
    const bf16_t* const lo[1] = {w + (long long)min(h0 + g, H - 1) * I};
    const bf16_t* const hi[1] = {w + (long long)min(h0 + g + 8, H - 1) * I};
    const int s0 = kp * spp, s1 = min(ksteps, s0 + spp);
    for (int c0 = 0; c0 < count; c0 += TOK) {
      const bf16_t* xr[NT];
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int m = c0 + 8 * j + g;
        xr[j] = act + (long long)(start + (m < count ? m : 0)) * I + 8 * q;
      }
      float acc[1][NT][4] = {};
      stream_k<1, NT, U>(acc, lo, hi, xr, s0, s1, I);
      // a token meets an expert once, so no two lanes add to the same accumulator here
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int m = c0 + 8 * j + 2 * q + (i & 1), r = g + 8 * (i >> 1);
          if (m < count && h0 + r < H) {
            const int p = sorted[start + m];
            mine[(p / topk) * 16 + r] += weights[p] * acc[0][j][i];
          }
        }
      __syncwarp();
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < T * 16; i += blockDim.x) {
    const int t = i >> 4, r = i & 15;
    if (h0 + r >= H) continue;
    float s = 0.0f;
    for (int v = 0; v < warps; ++v) s += acc_t[(long long)v * T * 16 + i];
    out[(long long)t * H + h0 + r] = f2bf(s);
  }
}

#define MOE_GV_ENTRIES(NT, UG, UD)                                                                 \
  extern "C" __global__ void __launch_bounds__(128, 4) moe_gv_gate_up_nt##NT(                      \
      const bf16_t* __restrict__ x, const int* __restrict__ sorted,                                \
      const int* __restrict__ slot_expert, const int* __restrict__ slot_start,                     \
      const int* __restrict__ slot_count, const bf16_t* __restrict__ gate_up,                      \
      bf16_t* __restrict__ act, int H, int I, int topk, int spw) {                                 \
    moe_gv_gate_up<NT, UG>(x, sorted, slot_expert, slot_start, slot_count, gate_up, act, H, I,     \
                          topk, spw);                                                              \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(256, 2) moe_gv_down_nt##NT(                         \
      const bf16_t* __restrict__ act, const int* __restrict__ sorted,                              \
      const int* __restrict__ slot_expert, const int* __restrict__ slot_start,                     \
      const int* __restrict__ slot_count, const float* __restrict__ weights,                       \
      const bf16_t* __restrict__ down, bf16_t* __restrict__ out, int T, int H, int I, int topk,    \
      int max_slots, int kparts) {                                                                 \
    moe_gv_down<NT, UD>(act, sorted, slot_expert, slot_start, slot_count, weights, down, out, T,   \
                       H, I, topk, max_slots, kparts);                                             \
  }
MOE_GV_ENTRIES(1, 2, 4)
MOE_GV_ENTRIES(2, 2, 2)
MOE_GV_ENTRIES(4, 1, 1)
