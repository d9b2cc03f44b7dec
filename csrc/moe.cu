// Mixture of experts: routing, grouping, and the experts path for all selected experts in one
// launch per GEMM (never one launch per expert).
//
// Decode batches group the pairs by expert (moe_group) and stream each touched expert once
// (moe_decode.cu). Dims that are not multiples of 8 take GEMV-like kernels over
// (token, expert) pairs: a warp per output row. Larger batches group the pairs by expert on
// the device (moe_align), run a grouped GEMM on the tensor cores (mma.sync m16n8k16 bf16,
// float32 accumulation) whose tiles each belong to one expert, and combine each token's K
// expert outputs with their routing weights. Expert ids never leave the device.
#include "common.cuh"

// -- routing ------------------------------------------------------------------------------

#define ROUTE_TOKENS 8  // tokens per block of moe_router_logits
#define ROUTE_SPLIT 256  // hidden elements per warp: one 8-element chunk per lane

// partial[s, t, e] = x[t, h] . router[e, h] over h in split s (ROUTE_SPLIT elements), float32;
// moe_topk adds the splits. x: [T, H] bf16; router: [E, H] f32; partial: [S, T, E] f32.
// Grid (ceil(E / 8), S = ceil(H / ROUTE_SPLIT), ceil(T / ROUTE_TOKENS)), 256 threads: warp w
// owns expert 8 * blockIdx.x + w. Splitting H puts the 655 KB router read on E * S / 8 blocks
// even at one token; a warp per whole router row left it waiting on memory (8 us).
extern "C" __global__ void __launch_bounds__(256)
    moe_router_logits(const bf16_t* __restrict__ x, const float* __restrict__ router,
                      float* __restrict__ partial, int T, int H, int E) {
  pdl_start();
  const int lane = threadIdx.x & 31, e = blockIdx.x * 8 + (threadIdx.x >> 5);
  if (e >= E) return;
  const int t0 = blockIdx.z * ROUTE_TOKENS, nt = min(ROUTE_TOKENS, T - t0);
  const int h0 = blockIdx.y * ROUTE_SPLIT, h1 = min(H, h0 + ROUTE_SPLIT);
  const float* r = router + (long long)e * H;
  const bf16_t* xt = x + (long long)t0 * H;
  float s[ROUTE_TOKENS];
#pragma unroll
  for (int i = 0; i < ROUTE_TOKENS; ++i) s[i] = 0.0f;
  if ((H & 7) == 0) {  // 16-byte loads: 8 router floats, 8 x values
    const int h = h0 + 8 * lane;
    if (h < h1) {
      const u32x4 r0 = *(const u32x4*)(r + h), r1 = *(const u32x4*)(r + h + 4);
#pragma unroll
      for (int i = 0; i < ROUTE_TOKENS; ++i) {
        if (i >= nt) break;
        const u32x4 v = *(const u32x4*)(xt + (long long)i * H + h);
        s[i] = lo_bf(v.x) * __uint_as_float(r0.x) + hi_bf(v.x) * __uint_as_float(r0.y) +
               lo_bf(v.y) * __uint_as_float(r0.z) + hi_bf(v.y) * __uint_as_float(r0.w) +
               lo_bf(v.z) * __uint_as_float(r1.x) + hi_bf(v.z) * __uint_as_float(r1.y) +
               lo_bf(v.w) * __uint_as_float(r1.z) + hi_bf(v.w) * __uint_as_float(r1.w);
      }
    }
  } else {
#pragma unroll
    for (int c = 0; c < ROUTE_SPLIT / 32; ++c) {
      const int h = h0 + lane + 32 * c;
      if (h >= h1) break;
      const float rv = r[h];
#pragma unroll
      for (int i = 0; i < ROUTE_TOKENS; ++i)
        if (i < nt) s[i] += bf2f(xt[(long long)i * H + h]) * rv;
    }
  }
#pragma unroll
  for (int i = 0; i < ROUTE_TOKENS; ++i) {
    if (i >= nt) break;
    const float v = warp_sum(s[i]);
    if (lane == 0) partial[((long long)blockIdx.y * T + t0 + i) * E + e] = v;
  }
}

#define ROUTE_PER_LANE 4  // E <= 128

// p = softmax(logits[t]), logits the sum of moe_router_logits' S splits in order; the K
// experts with the largest p + bias (ties to the lower id), in that order, weighted by their
// unbiased p over max(sum of those p, norm_min). partial: [S, T, E]; bias: [E]; weights:
// [T, K] f32; ids: [T, K] int32. One warp per token (lane holds experts lane, lane + 32, ...),
// 8 per block; K <= 32.
extern "C" __global__ void __launch_bounds__(256)
    moe_topk(const float* __restrict__ partial, int S, const float* __restrict__ bias,
             float* __restrict__ weights, int* __restrict__ ids, int T, int E, int K,
             float norm_min) {
  pdl_start();
  const int lane = threadIdx.x & 31, t = blockIdx.x * 8 + (threadIdx.x >> 5);
  if (t >= T) return;
  float p[ROUTE_PER_LANE], b[ROUTE_PER_LANE];
  float mx = NEG_INF;
#pragma unroll
  for (int i = 0; i < ROUTE_PER_LANE; ++i) {
    const int e = lane + 32 * i;
    p[i] = NEG_INF;
    if (e < E) {
      p[i] = 0.0f;
      for (int sp = 0; sp < S; ++sp) p[i] += partial[((long long)sp * T + t) * E + e];
    }
    mx = fmaxf(mx, p[i]);
  }
  mx = warp_max(mx);
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < ROUTE_PER_LANE; ++i) {
    p[i] = lane + 32 * i < E ? expf(p[i] - mx) : 0.0f;
    sum += p[i];
  }
  sum = warp_sum(sum);
#pragma unroll
  for (int i = 0; i < ROUTE_PER_LANE; ++i) {
    const int e = lane + 32 * i;
    p[i] /= sum;
    b[i] = e < E ? p[i] + bias[e] : NEG_INF;
  }
  float chosen = 0.0f, my_p = 0.0f;
  int my_id = 0;
  for (int k = 0; k < K; ++k) {
    float bv = NEG_INF;
    int bi = 0x7fffffff;
#pragma unroll
    for (int i = 0; i < ROUTE_PER_LANE; ++i)  // ascending ids: strict > keeps the lower on ties
      if (b[i] > bv) {
        bv = b[i];
        bi = lane + 32 * i;
      }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (ov > bv || (ov == bv && oi < bi)) {
        bv = ov;
        bi = oi;
      }
    }
    float pv = 0.0f;  // the owner lane's p of the winner, sent to all
#pragma unroll
    for (int i = 0; i < ROUTE_PER_LANE; ++i)
      if (lane + 32 * i == bi) {
        pv = p[i];
        b[i] = NEG_INF;
      }
    pv = __shfl_sync(0xffffffffu, pv, bi & 31);
    chosen += pv;
    if (lane == k) {
      my_id = bi;
      my_p = pv;
    }
  }
  if (lane < K) {
    ids[(long long)t * K + lane] = my_id;
    weights[(long long)t * K + lane] = my_p / fmaxf(chosen, norm_min);
  }
}

// Groups the P = T * K pairs by expert for the decode kernels of moe_decode.cu: slot s < n (n the
// number of experts any pair picked, in increasing id order) is expert slot_expert[s], whose
// pairs are sorted[slot_start[s] .. + slot_count[s]]; slot_expert[s] = -1 for n <= s <
// max_slots; pos[p] (unless null) is the position of pair p in `sorted`. The order of pairs
// inside an expert varies from run to run; no result depends on it. One block; dynamic shared
// memory 3E ints.
extern "C" __global__ void moe_group(const int* __restrict__ ids, int P, int E, int max_slots,
                                     int* __restrict__ sorted, int* __restrict__ slot_expert,
                                     int* __restrict__ slot_start, int* __restrict__ slot_count,
                                     int* __restrict__ pos) {
  pdl_start();
  extern __shared__ int counts[];  // [E] counts, [E] offsets, [E] cursors
  int* offsets = counts + E;
  int* cursor = offsets + E;
  for (int e = threadIdx.x; e < E; e += blockDim.x) counts[e] = cursor[e] = 0;
  __syncthreads();
  for (int p = threadIdx.x; p < P; p += blockDim.x) atomicAdd(&counts[ids[p]], 1);
  __syncthreads();
  if (threadIdx.x < 32) {  // one warp scans the counts, 32 experts at a time
    const int lane = threadIdx.x;
    int off = 0, n = 0;
    for (int base = 0; base < E; base += 32) {
      const int e = base + lane, c = e < E ? counts[e] : 0;
      int incl = c;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int v = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += v;
      }
      const unsigned hit = __ballot_sync(0xffffffffu, c > 0);
      if (e < E) offsets[e] = off + incl - c;
      if (c > 0) {
        const int s = n + __popc(hit & ((1u << lane) - 1u));
        slot_expert[s] = e;
        slot_start[s] = off + incl - c;
        slot_count[s] = c;
      }
      off += __shfl_sync(0xffffffffu, incl, 31);
      n += __popc(hit);
    }
    for (int s = n + lane; s < max_slots; s += 32) slot_expert[s] = -1;
  }
  __syncthreads();
  for (int p = threadIdx.x; p < P; p += blockDim.x) {
    const int e = ids[p], i = offsets[e] + atomicAdd(&cursor[e], 1);
    sorted[i] = p;
    if (pos) pos[p] = i;
  }
}

// -- small batches: one warp per output row of one (token, expert) pair ------------------

// act[p, j] = silu(gate_e[j] . x[t]) * (up_e[j] . x[t]) for pair p = t * K + k, e = ids[p].
// x: [T, H] bf16; ids: [T * K] int32; gate_up: [E, 2I, H] bf16 (gate rows, then up rows);
// act: [T * K, I] bf16. Grid (T * K, ceil(I / 4)), 128 threads.
extern "C" __global__ void moe_gemv_gate_up(const bf16_t* __restrict__ x,
                                            const int* __restrict__ ids,
                                            const bf16_t* __restrict__ gate_up,
                                            bf16_t* __restrict__ act, int H, int I, int K) {
  pdl_start();
  const int lane = threadIdx.x & 31, j = blockIdx.y * 4 + (threadIdx.x >> 5);
  if (j >= I) return;
  const int p = blockIdx.x;
  const bf16_t* xr = x + (long long)(p / K) * H;
  const bf16_t* g = gate_up + ((long long)ids[p] * 2 * I + j) * H;
  const bf16_t* u = g + (long long)I * H;
  const float gs = warp_sum(lane_dot(g, xr, H, lane));
  const float us = warp_sum(lane_dot(u, xr, H, lane));
  if (lane == 0) act[(long long)p * I + j] = f2bf(silu(gs) * us);
}

// out[t, h] = sum_k weights[t, k] * (down_e[h] . act[t * K + k]), e = ids[t * K + k].
// act: [T * K, I] bf16; down: [E, H, I] bf16; weights: [T, K] f32; out: [T, H] bf16.
// Grid (T, ceil(H / 4)), 128 threads.
extern "C" __global__ void moe_gemv_down(const bf16_t* __restrict__ act,
                                         const int* __restrict__ ids,
                                         const float* __restrict__ weights,
                                         const bf16_t* __restrict__ down,
                                         bf16_t* __restrict__ out, int H, int I, int K) {
  pdl_start();
  const int lane = threadIdx.x & 31, h = blockIdx.y * 4 + (threadIdx.x >> 5);
  if (h >= H) return;
  const int t = blockIdx.x;
  float total = 0.0f;
  for (int k = 0; k < K; ++k) {
    const int p = t * K + k;
    const bf16_t* w = down + ((long long)ids[p] * H + h) * I;
    total += weights[p] * warp_sum(lane_dot(w, act + (long long)p * I, I, lane));
  }
  if (lane == 0) out[(long long)t * H + h] = f2bf(total);
}

// -- larger batches: pairs grouped by expert, grouped GEMM on the tensor cores -------------

// Groups the P = T * K pairs by expert: sorted[] lists pair ids expert by expert, and tile i
// covers sorted[tile_start[i] : min(tile_start[i] + bm, tile_end[i])] of expert
// tile_expert[i] (-1 past the last tile). One block; dynamic shared memory 3E ints. The order
// of pairs inside an expert varies from run to run; no result depends on it.
extern "C" __global__ void moe_align(const int* __restrict__ ids, int P, int E, int bm,
                                     int max_tiles, int* __restrict__ sorted,
                                     int* __restrict__ tile_expert, int* __restrict__ tile_start,
                                     int* __restrict__ tile_end) {
  pdl_start();
  extern __shared__ int counts[];  // [E] counts, [E] offsets, [E] cursors
  int* offsets = counts + E;
  int* cursor = offsets + E;
  for (int e = threadIdx.x; e < E; e += blockDim.x) counts[e] = cursor[e] = 0;
  __syncthreads();
  for (int p = threadIdx.x; p < P; p += blockDim.x) atomicAdd(&counts[ids[p]], 1);
  __syncthreads();
  if (threadIdx.x == 0) {
    int off = 0, tile = 0;
    for (int e = 0; e < E; ++e) {
      offsets[e] = off;
      for (int r = 0; r < counts[e]; r += bm, ++tile) {
        tile_expert[tile] = e;
        tile_start[tile] = off + r;
        tile_end[tile] = off + counts[e];
      }
      off += counts[e];
    }
    for (; tile < max_tiles; ++tile) tile_expert[tile] = -1;
  }
  __syncthreads();
  for (int p = threadIdx.x; p < P; p += blockDim.x) {
    const int e = ids[p];
    sorted[offsets[e] + atomicAdd(&cursor[e], 1)] = p;
  }
}

#define GM_BM 64
#define GM_BN 64
#define GM_BK 32
#define GM_LD (GM_BK + 8)  // shared row length in bf16: 80 bytes, so fragment reads miss no bank
#define GM_THREADS 128

// d += a (16x16, row) * b (16x8, col), bf16 in, f32 accumulate
__device__ __forceinline__ void mma_bf16(float* d, const u32* a, const u32* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Copies a [64 rows, 32] bf16 tile into shared memory (row length GM_LD), columns k0.. of
// `cols` (a multiple of 8); rows past `rows` or columns past `cols` read as zero. Row r comes
// from src + row_index(r) * cols.
template <typename RowIndex>
__device__ __forceinline__ void load_tile(bf16_t* dst, const bf16_t* __restrict__ src,
                                          int rows, int cols, int k0, RowIndex row_index) {
  for (int c = threadIdx.x; c < GM_BM * (GM_BK / 8); c += GM_THREADS) {
    const int r = c >> 2, k = (c & 3) * 8;
    u32x4 v = {0u, 0u, 0u, 0u};
    if (r < rows && k0 + k < cols) v = *(const u32x4*)(src + row_index(r) * cols + k0 + k);
    *(u32x4*)(dst + r * GM_LD + k) = v;
  }
}

struct Contiguous {
  long long base;
  __device__ long long operator()(int r) const { return base + r; }
};
struct TokenOfPair {  // rows of x gathered by token: pair p is token p / K
  const int* sorted;
  int start, K;
  __device__ long long operator()(int r) const { return sorted[start + r] / K; }
};

// One warp's 16 rows x 64 columns of a k-step: acc[n][4] += A[16 x 16] * B[64 x 16]^T.
__device__ __forceinline__ void warp_mma_64(float (*acc)[4], const bf16_t* as, const bf16_t* bs,
                                            int kk) {
  const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3, r0 = (threadIdx.x >> 5) * 16;
  u32 a[4];
  a[0] = *(const u32*)(as + (r0 + g) * GM_LD + kk + 2 * q);
  a[1] = *(const u32*)(as + (r0 + g + 8) * GM_LD + kk + 2 * q);
  a[2] = *(const u32*)(as + (r0 + g) * GM_LD + kk + 8 + 2 * q);
  a[3] = *(const u32*)(as + (r0 + g + 8) * GM_LD + kk + 8 + 2 * q);
#pragma unroll
  for (int n = 0; n < GM_BN / 8; ++n) {
    u32 b[2];
    b[0] = *(const u32*)(bs + (n * 8 + g) * GM_LD + kk + 2 * q);
    b[1] = *(const u32*)(bs + (n * 8 + g) * GM_LD + kk + 8 + 2 * q);
    mma_bf16(acc[n], a, b);
  }
}

// act[pos, j] = silu(gate_e[j] . x[token]) * (up_e[j] . x[token]) for each sorted position
// pos of a tile of expert e, columns j of this block. x: [T, H] bf16; gate_up: [E, 2I, H];
// act: [P, I] bf16 in sorted order. Grid (max_tiles, ceil(I / 64)), 128 threads.
extern "C" __global__ void __launch_bounds__(GM_THREADS) moe_gemm_gate_up(
    const bf16_t* __restrict__ x, const int* __restrict__ sorted,
    const int* __restrict__ tile_expert, const int* __restrict__ tile_start,
    const int* __restrict__ tile_end, const bf16_t* __restrict__ gate_up,
    bf16_t* __restrict__ act, int H, int I, int K) {
  pdl_start();
  __shared__ alignas(16) bf16_t as[GM_BM * GM_LD];
  __shared__ alignas(16) bf16_t gs[GM_BN * GM_LD];
  __shared__ alignas(16) bf16_t us[GM_BN * GM_LD];
  const int e = tile_expert[blockIdx.x];
  if (e < 0) return;
  const int start = tile_start[blockIdx.x];
  const int rows = min(GM_BM, tile_end[blockIdx.x] - start);
  const int n0 = blockIdx.y * GM_BN, cols = min(GM_BN, I - n0);
  const bf16_t* w = gate_up + (long long)e * 2 * I * H;
  float acc_g[GM_BN / 8][4], acc_u[GM_BN / 8][4];
#pragma unroll
  for (int n = 0; n < GM_BN / 8; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc_g[n][i] = acc_u[n][i] = 0.0f;
  for (int k0 = 0; k0 < H; k0 += GM_BK) {
    load_tile(as, x, rows, H, k0, TokenOfPair{sorted, start, K});
    load_tile(gs, w, cols, H, k0, Contiguous{n0});
    load_tile(us, w, cols, H, k0, Contiguous{(long long)I + n0});
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < GM_BK; kk += 16) {
      warp_mma_64(acc_g, as, gs, kk);
      warp_mma_64(acc_u, as, us, kk);
    }
    __syncthreads();
  }
  const int lane = threadIdx.x & 31, r0 = (threadIdx.x >> 5) * 16 + (lane >> 2);
#pragma unroll
  for (int n = 0; n < GM_BN / 8; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = r0 + (i >> 1) * 8, c = n * 8 + 2 * (lane & 3) + (i & 1);
      if (r < rows && c < cols)
        act[(long long)(start + r) * I + n0 + c] = f2bf(silu(acc_g[n][i]) * acc_u[n][i]);
    }
}

// y[pair, h] = down_e[h] . act[pos] for each sorted position pos (pair = sorted[pos]).
// act: [P, I] bf16 in sorted order; down: [E, H, I] bf16; y: [P, H] f32 by pair.
// Grid (max_tiles, ceil(H / 64)), 128 threads.
extern "C" __global__ void __launch_bounds__(GM_THREADS) moe_gemm_down(
    const bf16_t* __restrict__ act, const int* __restrict__ sorted,
    const int* __restrict__ tile_expert, const int* __restrict__ tile_start,
    const int* __restrict__ tile_end, const bf16_t* __restrict__ down, float* __restrict__ y,
    int H, int I) {
  pdl_start();
  __shared__ alignas(16) bf16_t as[GM_BM * GM_LD];
  __shared__ alignas(16) bf16_t ws[GM_BN * GM_LD];
  const int e = tile_expert[blockIdx.x];
  if (e < 0) return;
  const int start = tile_start[blockIdx.x];
  const int rows = min(GM_BM, tile_end[blockIdx.x] - start);
  const int n0 = blockIdx.y * GM_BN, cols = min(GM_BN, H - n0);
  const bf16_t* w = down + (long long)e * H * I;
  float acc[GM_BN / 8][4];
#pragma unroll
  for (int n = 0; n < GM_BN / 8; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[n][i] = 0.0f;
  for (int k0 = 0; k0 < I; k0 += GM_BK) {
    load_tile(as, act, rows, I, k0, Contiguous{start});
    load_tile(ws, w, cols, I, k0, Contiguous{n0});
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < GM_BK; kk += 16) warp_mma_64(acc, as, ws, kk);
    __syncthreads();
  }
  const int lane = threadIdx.x & 31, r0 = (threadIdx.x >> 5) * 16 + (lane >> 2);
#pragma unroll
  for (int n = 0; n < GM_BN / 8; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = r0 + (i >> 1) * 8, c = n * 8 + 2 * (lane & 3) + (i & 1);
      if (r < rows && c < cols) y[(long long)sorted[start + r] * H + n0 + c] = acc[n][i];
    }
}

// out[t, h] = sum_k weights[t, k] * y[t * K + k, h], in a fixed order. y: [T * K, H] f32;
// out: [T, H] bf16. One block per token.
extern "C" __global__ void moe_combine(const float* __restrict__ y,
                                       const float* __restrict__ weights,
                                       bf16_t* __restrict__ out, int H, int K) {
  pdl_start();
  const long long t = blockIdx.x;
  for (int h = threadIdx.x; h < H; h += blockDim.x) {
    float s = 0.0f;
    for (int k = 0; k < K; ++k) s += weights[t * K + k] * y[(t * K + k) * H + h];
    out[t * H + h] = f2bf(s);
  }
}
