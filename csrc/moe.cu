// Mixture of experts: routing and grouping on the device, and the experts of (token, expert)
// pairs for dims that are not multiples of 8.
//
// Batches below the prefill path's size group the pairs by expert (moe_group) and stream each
// touched expert once (moe_decode.cu); long prefills run cuBLAS GEMMs over the grouped pairs
// (moe_chunks.cu and backends/cupy_moe_prefill.py). Dims that are not multiples of 8 take
// GEMV-like kernels over (token, expert) pairs: a warp per output row. Expert ids never leave
// the device, except as per-expert counts on the prefill path.
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
// max_slots; pos[p] is the position of pair p in `sorted`. The order of pairs
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
    pos[p] = i;
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
