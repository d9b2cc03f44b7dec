// The experts of a MoE layer at decode sizes (up to a few hundred tokens): each touched routed
// expert's weights, and the shared experts', are read once per layer against all of their
// tokens, on weight_stream.cuh's inner loop. Three launches: gate/up with SiLU-mul fused, down,
// and the weighted combine, which adds the shared experts' output.
//
// Slots: blocks with blockIdx.x < max_slots take moe_group's (moe.cu) slots: slot s names expert
// slot_expert[s] (-1: none, and so are all later slots) whose pairs are
// sorted[slot_start[s] + m], m < slot_count[s]; pair p is token p / topk. The n_shared slots after
// them take the shared experts, fused as one MLP of intermediate Is: shared slot j owns its
// units [j * I, min(Is, (j + 1) * I)) for every token, so a shared expert streams like a routed
// one. A slot's tokens go in chunks of 8 * NT; a chunk past the first re-reads the slot's rows
// (from L2, just read by the same block), which only the shared slots at large batches and a
// very skewed routing need.
#include "norm.cuh"
#include "weight_stream.cuh"

// Where a slot's weights and tokens are: `w` is its expert's gate_up [2I, H] or down [H, I] (or
// the shared experts'), its units are [row0, row0 + rows): rows of the gate (and of the up half,
// `half` rows further), or input columns of the down projection.
struct ExpertSlot {
  const bf16_t* w;
  int half, row0, rows;
  int start, count;  // positions start .. start + count of `sorted`, or tokens 0 .. count
  bool shared;
};

// False for a slot no expert fills. `routed` holds the experts' matrices, `stride` elements apart.
__device__ __forceinline__ bool slot_of(ExpertSlot& s, int slot, const int* slot_expert,
                                        const int* slot_start, const int* slot_count,
                                        const bf16_t* routed, long long stride,
                                        const bf16_t* shared, int T, int I, int Is,
                                        int max_slots) {
  s.shared = slot >= max_slots;
  if (!s.shared) {
    const int e = slot_expert[slot];
    if (e < 0) return false;
    s.w = routed + e * stride;
    s.half = I;
    s.row0 = 0;
    s.rows = I;
    s.start = slot_start[slot];
    s.count = slot_count[slot];
  } else {
    s.w = shared;
    s.half = Is;
    s.row0 = (slot - max_slots) * I;
    s.rows = min(I, Is - s.row0);
    s.start = 0;
    s.count = T;
  }
  return true;
}

// The token of the slot's m-th position (m < count).
__device__ __forceinline__ int token_of(const ExpertSlot& s, const int* sorted, int m, int topk) {
  return s.shared ? m : sorted[s.start + m] / topk;
}

// Routed: act[pos, j] = silu(gate_e[j] . x[tok]) * up_e[j] . x[tok] for every sorted position
// pos of the slot, j < I; shared slot j: act_shared[t, u] for its units u. x: [T, H] bf16;
// gate_up: [E, 2I, H]; shared_gate_up: [2 Is, H]; act: [P, I]; act_shared: [T, Is] (bf16).
// Grid (max_slots + n_shared, ceil(I / 16)); the block's warps split H into ranges of `spw`
// k-steps. Dynamic shared memory: warps * 2 * 16 * 8 * NT floats.
template <int NT, int U>
__device__ __forceinline__ void moe_gate_up(
    const bf16_t* __restrict__ x, const int* __restrict__ sorted,
    const int* __restrict__ slot_expert, const int* __restrict__ slot_start,
    const int* __restrict__ slot_count, const bf16_t* __restrict__ gate_up,
    const bf16_t* __restrict__ shared_gate_up, bf16_t* __restrict__ act,
    bf16_t* __restrict__ act_shared, int T, int H, int I, int Is, int topk, int max_slots,
    int spw) {
  extern __shared__ float part[];  // [warps][gate, up][16][8 * NT]
  ExpertSlot s;
  if (!slot_of(s, blockIdx.x, slot_expert, slot_start, slot_count, gate_up, 2LL * I * H,
               shared_gate_up, T, I, Is, max_slots))
    return;  // the whole block: no barrier is skipped by part of it
  const int j0 = blockIdx.y * 16;
  if (j0 >= s.rows) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int g = lane >> 2, q = lane & 3;
  const int s0 = warp * spw, s1 = min((H + 31) >> 5, s0 + spw);
  // rows past the slot's read its last row, positions past count its first: dropped below
  const bf16_t* gate = s.w + 8 * q;
  const long long r_lo = (long long)(s.row0 + min(j0 + g, s.rows - 1)) * H;
  const long long r_hi = (long long)(s.row0 + min(j0 + g + 8, s.rows - 1)) * H;
  const long long up = (long long)s.half * H;
  const bf16_t* const lo[2] = {gate + r_lo, gate + up + r_lo};
  const bf16_t* const hi[2] = {gate + r_hi, gate + up + r_hi};
  bf16_t* out = s.shared ? act_shared + s.row0 : act + (long long)s.start * I;
  const int ld_out = s.shared ? Is : I;
  constexpr int TOK = 8 * NT;
  for (int c0 = 0; c0 < s.count; c0 += TOK) {
    const bf16_t* xr[NT];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int m = c0 + 8 * j + g;
      xr[j] = x + (long long)token_of(s, sorted, m < s.count ? m : 0, topk) * H + 8 * q;
    }
    float acc[2][NT][4] = {};
    stream_k<2, NT, U>(acc, lo, hi, xr, s0, s1, H);
    store_part<NT>(part + (warp * 2) * 16 * TOK, acc[0]);
    store_part<NT>(part + (warp * 2 + 1) * 16 * TOK, acc[1]);
    __syncthreads();
    for (int i = threadIdx.x; i < 16 * TOK; i += blockDim.x) {
      const int m = c0 + (i >> 4), r = i & 15;
      if (m >= s.count || j0 + r >= s.rows) continue;
      float gs = 0.0f, us = 0.0f;
      for (int v = 0; v < warps; ++v) {
        gs += part[((v * 2) * 16 + r) * TOK + (i >> 4)];
        us += part[((v * 2 + 1) * 16 + r) * TOK + (i >> 4)];
      }
      out[(long long)m * ld_out + j0 + r] = f2bf(silu(gs) * us);
    }
    __syncthreads();  // the next chunk overwrites part
  }
}

// Routed: y[pos, h] = down_e[h] . act[pos] for every sorted position pos of the slot; shared
// slot j: y_shared[j, t, h] = shared_down[h, its units] . act_shared[t, its units]. down: [E, H,
// I]; shared_down: [H, Is]; y: [P, H] and y_shared: [n_shared, T, H] float32. Grid (max_slots +
// n_shared, ceil(H / 16)); the block's warps split the slot's units into ranges of `spw`
// k-steps. Dynamic shared memory: warps * 16 * 8 * NT floats.
template <int NT, int U>
__device__ __forceinline__ void moe_down(
    const bf16_t* __restrict__ act, const bf16_t* __restrict__ act_shared,
    const int* __restrict__ slot_expert, const int* __restrict__ slot_start,
    const int* __restrict__ slot_count, const bf16_t* __restrict__ down,
    const bf16_t* __restrict__ shared_down, float* __restrict__ y, float* __restrict__ y_shared,
    int T, int H, int I, int Is, int max_slots, int spw) {
  extern __shared__ float part[];  // [warps][16][8 * NT]
  ExpertSlot s;
  if (!slot_of(s, blockIdx.x, slot_expert, slot_start, slot_count, down, (long long)H * I,
               shared_down, T, I, Is, max_slots))
    return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int g = lane >> 2, q = lane & 3, h0 = blockIdx.y * 16;
  const int s0 = warp * spw, s1 = min((s.rows + 31) >> 5, s0 + spw);
  const int ldw = s.shared ? Is : I;
  const bf16_t* w = s.w + s.row0 + 8 * q;
  const bf16_t* const lo[1] = {w + (long long)min(h0 + g, H - 1) * ldw};
  const bf16_t* const hi[1] = {w + (long long)min(h0 + g + 8, H - 1) * ldw};
  const bf16_t* a = s.shared ? act_shared + s.row0 : act + (long long)s.start * I;
  float* out = s.shared ? y_shared + (long long)(blockIdx.x - max_slots) * T * H
                        : y + (long long)s.start * H;
  constexpr int TOK = 8 * NT;
  for (int c0 = 0; c0 < s.count; c0 += TOK) {
    const bf16_t* xr[NT];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int m = c0 + 8 * j + g;
      xr[j] = a + (long long)(m < s.count ? m : 0) * ldw + 8 * q;
    }
    float acc[1][NT][4] = {};
    stream_k<1, NT, U>(acc, lo, hi, xr, s0, s1, s.rows);
    store_part<NT>(part + warp * 16 * TOK, acc[0]);
    __syncthreads();
    for (int i = threadIdx.x; i < 16 * TOK; i += blockDim.x) {
      const int m = c0 + (i >> 4), r = i & 15;  // neighbouring threads: neighbouring columns
      if (m >= s.count || h0 + r >= H) continue;
      float sum = 0.0f;
      for (int v = 0; v < warps; ++v) sum += part[(v * 16 + r) * TOK + (i >> 4)];
      out[(long long)m * H + h0 + r] = sum;
    }
    __syncthreads();
  }
}

// Token t's pairs: their positions in `sorted` (moe_group) and weights, into shared memory for
// the whole block (topk <= 32).
__device__ __forceinline__ void token_pairs(int* row, float* wt, const int* __restrict__ pos,
                                            const float* __restrict__ weights, int t, int topk) {
  if (threadIdx.x < topk) {
    row[threadIdx.x] = pos[t * topk + threadIdx.x];
    wt[threadIdx.x] = weights[t * topk + threadIdx.x];
  }
  __syncthreads();
}

// Token t's experts at element h: sum_k wt[k] * y[row[k], h] + sum_j y_shared[j, t, h], in that
// order, float32. y: [P, H]; y_shared: [n_shared, T, H].
__device__ __forceinline__ float combined(const float* __restrict__ y,
                                          const float* __restrict__ y_shared, const int* row,
                                          const float* wt, int topk, int n_shared, int T, int t,
                                          int H, int h) {
  float sum = 0.0f;
#pragma unroll 8
  for (int k = 0; k < topk; ++k) sum += wt[k] * y[(long long)row[k] * H + h];
  for (int j = 0; j < n_shared; ++j) sum += y_shared[((long long)j * T + t) * H + h];
  return sum;
}

// out[t] = bf16(combined(t)). pos: [T * topk] the sorted position of each pair (moe_group).
// Grid (T, ceil(H / blockDim.x)): a thread per output, its loads independent of one another.
extern "C" __global__ void moe_combine_decode(const float* __restrict__ y,
                                              const float* __restrict__ y_shared,
                                              const int* __restrict__ pos,
                                              const float* __restrict__ weights,
                                              bf16_t* __restrict__ out, int T, int H, int topk,
                                              int n_shared) {
  pdl_start();
  __shared__ int row[32];
  __shared__ float wt[32];
  const int t = blockIdx.x, h = blockIdx.y * blockDim.x + threadIdx.x;
  token_pairs(row, wt, pos, weights, t, topk);
  if (h < H)
    out[(long long)t * H + h] = f2bf(combined(y, y_shared, row, wt, topk, n_shared, T, t, H, h));
}

// r[c] = src[threadIdx.x + c * blockDim.x] (a thread's elements of a row, as norm.cuh lays them
// out) where `ok` and inside the row's H elements, else 0.
__device__ __forceinline__ void load_row(float (&r)[NORM_VALS], const float* __restrict__ src,
                                         bool ok, int H) {
#pragma unroll
  for (int c = 0; c < NORM_VALS; ++c) {
    const int i = threadIdx.x + c * blockDim.x;
    r[c] = ok && i < H ? src[i] : 0.0f;
  }
}

// moe_combine_decode, then add_rms_norm (norm.cu) of its output in the same launch, rounding as
// the two do: res_out[t] = bf16(combined(t)) + residual[t] in float32 (residual bf16, or float32
// when res_f32), out[t] = rms_norm(res_out[t]) * w as bf16. One block per token; blockDim.x *
// NORM_VALS >= H. The first 8 experts' and 4 shared slots' loads are all issued before any is
// waited on (a loop per element waited once per pair: 20 us a token, four times the two kernels).
extern "C" __global__ void moe_combine_add_rms_norm(
    const float* __restrict__ y, const float* __restrict__ y_shared, const int* __restrict__ pos,
    const float* __restrict__ weights, const void* __restrict__ residual, int res_f32,
    const bf16_t* __restrict__ w, bf16_t* __restrict__ out, float* __restrict__ res_out, int T,
    int H, int topk, int n_shared, float eps) {
  pdl_start();
  __shared__ int row[32];
  __shared__ float wt[32];
  const int t = blockIdx.x;
  token_pairs(row, wt, pos, weights, t, topk);
  const long long base = (long long)t * H;
  float v[NORM_VALS], wv[NORM_VALS], ss = 0.0f;
#pragma unroll
  for (int c = 0; c < NORM_VALS; ++c) v[c] = 0.0f;
  // the sums of combined(), term by term in its order; the first terms' loads all up front
  float yk[8][NORM_VALS], ys[4][NORM_VALS];
#pragma unroll
  for (int k = 0; k < 8; ++k)
    load_row(yk[k], y + (long long)row[k < topk ? k : 0] * H, k < topk, H);
#pragma unroll
  for (int j = 0; j < 4; ++j)
    load_row(ys[j], y_shared + ((long long)j * T + t) * H, j < n_shared, H);
#pragma unroll
  for (int k = 0; k < 8; ++k)
    if (k < topk)
#pragma unroll
      for (int c = 0; c < NORM_VALS; ++c) v[c] += wt[k] * yk[k][c];
  for (int k = 8; k < topk; ++k) {  // yk[0] free again
    load_row(yk[0], y + (long long)row[k] * H, true, H);
#pragma unroll
    for (int c = 0; c < NORM_VALS; ++c) v[c] += wt[k] * yk[0][c];
  }
#pragma unroll
  for (int j = 0; j < 4; ++j)
    if (j < n_shared)
#pragma unroll
      for (int c = 0; c < NORM_VALS; ++c) v[c] += ys[j][c];
  for (int j = 4; j < n_shared; ++j) {
    load_row(ys[0], y_shared + ((long long)j * T + t) * H, true, H);
#pragma unroll
    for (int c = 0; c < NORM_VALS; ++c) v[c] += ys[0][c];
  }
#pragma unroll
  for (int c = 0; c < NORM_VALS; ++c) {
    const int i = threadIdx.x + c * blockDim.x;
    wv[c] = 0.0f;
    if (i < H) {
      const long long j = base + i;
      const float r = res_f32 ? ((const float*)residual)[j] : bf2f(((const bf16_t*)residual)[j]);
      v[c] = bf2f(f2bf(v[c])) + r;
      wv[c] = bf2f(w[i]);
      res_out[j] = v[c];
      ss += v[c] * v[c];
    } else {
      v[c] = 0.0f;
    }
  }
  store_normed(v, wv, ss, out, base, H, eps);
}

#define MOE_DECODE_ENTRIES(NT, UG, UD)                                                             \
  extern "C" __global__ void __launch_bounds__(128, 4) moe_gate_up_nt##NT(                         \
      const bf16_t* __restrict__ x, const int* __restrict__ sorted,                                \
      const int* __restrict__ slot_expert, const int* __restrict__ slot_start,                     \
      const int* __restrict__ slot_count, const bf16_t* __restrict__ gate_up,                      \
      const bf16_t* __restrict__ shared_gate_up, bf16_t* __restrict__ act,                         \
      bf16_t* __restrict__ act_shared, int T, int H, int I, int Is, int topk, int max_slots,       \
      int spw) { pdl_start();                                                                      \
    moe_gate_up<NT, UG>(x, sorted, slot_expert, slot_start, slot_count, gate_up, shared_gate_up,   \
                        act, act_shared, T, H, I, Is, topk, max_slots, spw);                       \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(128, 4) moe_down_nt##NT(                            \
      const bf16_t* __restrict__ act, const bf16_t* __restrict__ act_shared,                       \
      const int* __restrict__ slot_expert, const int* __restrict__ slot_start,                     \
      const int* __restrict__ slot_count, const bf16_t* __restrict__ down,                         \
      const bf16_t* __restrict__ shared_down, float* __restrict__ y, float* __restrict__ y_shared, \
      int T, int H, int I, int Is, int max_slots, int spw) { pdl_start();                          \
    moe_down<NT, UD>(act, act_shared, slot_expert, slot_start, slot_count, down, shared_down, y,   \
                     y_shared, T, H, I, Is, max_slots, spw);                                       \
  }
MOE_DECODE_ENTRIES(1, 2, 4)
MOE_DECODE_ENTRIES(2, 2, 2)
MOE_DECODE_ENTRIES(4, 1, 2)
