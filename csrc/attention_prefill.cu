// Causal GQA attention of prefill chunks over the paged KV cache, on tensor cores, flash-attention
// 2 style: the score matrix lives in registers, softmax is online, K/V tiles are double-buffered
// in shared memory by cp.async, gathered row by row through the block table.
//
// Sequences with two or more new tokens are cut into query tiles of bq = 16 * tt tokens. A block
// owns one query tile, one KV head and up to hpb query heads of its group (blockDim = 32 * hpb *
// tt): warp w computes 16 tokens (w / hpb) of head (w % hpb), so the heads of one KV head share
// every K/V tile the block loads. Token j of a chunk of q_len tokens sits at position
// seq_len - q_len + j and sees keys 0..that position (a cached prefix included); KV tiles past
// the tile's last token are never loaded, and only tiles that cross the diagonal are masked.
//
// Math: S = Q K^T and O += P V with mma.sync m16n8k16 (bf16 in, fp32 accumulate), operands from
// shared memory through ldmatrix (rows XOR-swizzled in 16-byte pieces, so the 8 rows of each
// ldmatrix hit 8 different bank groups); P goes from the S accumulators straight into A
// fragments. The head dim is padded to DP (a multiple of 16): pieces past D load as zeros.
#include "ptx.cuh"

#define PF_BK 64  // keys per KV tile

template <int DP>
__device__ __forceinline__ void prefill_attention(
    const bf16_t* __restrict__ q,          // [T, heads, D]
    const bf16_t* __restrict__ kv,         // one layer [2, blocks, block_size, kv_heads, D]
    const int* __restrict__ query_start,   // [S + 1]
    const int* __restrict__ seq_lens,      // [S]
    const int* __restrict__ block_tables,  // [S, max_blocks]
    bf16_t* __restrict__ out,              // [T, heads, D]
    int num_seqs, int heads, int kv_heads, int D, int block_size, int max_blocks,
    long long kv_half, int hpb, int tt, float scale_log2) {
  constexpr int CH = DP / 8;              // 16-byte pieces per row
  constexpr int SWZ = CH < 8 ? CH - 1 : 7;  // XOR mask of the swizzle
  constexpr int RB = DP * 2;              // bytes per shared row
  constexpr int NT = DP / 8;              // n-tiles of O
  constexpr int KS = DP / 16;             // k-steps of S = Q K^T
  constexpr int SN = PF_BK / 8;           // n-tiles of S
  extern __shared__ u32x4 smem_v4[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int nthreads = blockDim.x, nwarps = nthreads >> 5, bq = 16 * tt;

  // this block's (sequence, query tile): the last tiles first, since causal tiles grow
  const int b = gridDim.x - 1 - blockIdx.x;
  int s = -1, tile = 0;
  for (int base = 0, seen = 0; base < num_seqs; base += 32) {
    const int i = base + lane;
    int n = 0;
    if (i < num_seqs) {
      const int ql = query_start[i + 1] - query_start[i];
      n = ql >= 2 ? (ql + bq - 1) / bq : 0;
    }
    int incl = n;  // inclusive prefix sum over the warp
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int t = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += t;
    }
    const unsigned hit = __ballot_sync(0xffffffffu, seen + incl > b);
    if (hit) {
      const int first = __ffs(hit) - 1;
      s = base + first;
      tile = b - seen - __shfl_sync(0xffffffffu, incl - n, first);
      break;
    }
    seen += __shfl_sync(0xffffffffu, incl, 31);
  }
  if (s < 0) return;  // grid sized by an upper bound (uniform over the block)

  const int group = heads / kv_heads, chunks = (group + hpb - 1) / hpb;
  const int kvh = blockIdx.y / chunks, hc0 = (blockIdx.y - kvh * chunks) * hpb;
  const int q0 = query_start[s], q_len = query_start[s + 1] - q0;
  const int base_pos = seq_lens[s] - q_len;
  const int i0 = tile * bq, nq = min(bq, q_len - i0), last = i0 + nq - 1;
  const int n_keys = base_pos + last + 1;  // keys the tile's last token sees
  const int n_tiles = (n_keys + PF_BK - 1) / PF_BK;
  const int* table = block_tables + (long long)s * max_blocks;

  unsigned char* sq = (unsigned char*)smem_v4;         // [nwarps * 16][DP]
  unsigned char* sk = sq + nwarps * 16 * RB;           // [2][BK][DP]
  unsigned char* sv = sk + 2 * PF_BK * RB;             // [2][BK][DP]
  const u32 aq = shared_addr(sq), ak = shared_addr(sk), av = shared_addr(sv);
  auto swz = [](int row, int piece) { return row * RB + ((piece ^ (row & SWZ)) << 4); };

  // query rows: warp w's row r is token i0 + (w / hpb) * 16 + r of head hc0 + w % hpb
  for (int i = tid; i < nwarps * 16 * CH; i += nthreads) {
    const int row = i / CH, pc = i - row * CH, w = row >> 4;
    const int tk = i0 + (w / hpb) * 16 + (row & 15), hh = hc0 + w % hpb;
    const bool ok = tk <= last && hh < group && pc * 8 < D;
    const bf16_t* src = ok ? q + ((long long)(q0 + tk) * heads + kvh * group + hh) * D + pc * 8 : q;
    cp_async16(aq + swz(row, pc), src, ok ? 16 : 0);
  }
  cp_async_commit();
  // K or V rows of KV tile j into stage st; rows past n_keys load as zeros. Each thread keeps
  // one 16-byte column pc of rows r0, r0 + rstep, ... (nthreads is a multiple of CH).
  const bool one_block = block_size % PF_BK == 0;  // a tile never straddles two blocks
  const int pc = tid % CH, r0 = tid / CH, rstep = nthreads / CH;
  const bool pc_ok = pc * 8 < D;
  const long long row_stride = (long long)kv_heads * D;  // elements from one slot to the next
  auto load_tile = [&](int j, int st, u32 dst, long long half) {
    const bf16_t* base = kv + half + kvh * D + pc * 8;
    const bf16_t* tile_src = base;
    if (one_block) {
      const int k0 = j * PF_BK;
      tile_src += ((long long)table[k0 / block_size] * block_size + k0 % block_size) * row_stride;
    }
    dst += st * PF_BK * RB;
    for (int row = r0; row < PF_BK; row += rstep) {
      const int key = j * PF_BK + row;
      const bool ok = key < n_keys && pc_ok;
      const bf16_t* src = kv;
      if (ok) {
        src = one_block ? tile_src + row * row_stride
                        : base + ((long long)table[key / block_size] * block_size +
                                  key % block_size) * row_stride;
      }
      cp_async16(dst + swz(row, pc), src, ok ? 16 : 0);
    }
  };
  load_tile(0, 0, ak, 0);
  load_tile(0, 0, av, kv_half);
  cp_async_commit();

  // this thread's two rows: g and g + 8 of the warp's 16; padded rows act as the last token
  const int g = lane >> 2, tg = lane & 3;
  const int wt0 = i0 + (warp / hpb) * 16;
  const int pos0 = base_pos + min(wt0 + g, last), pos1 = base_pos + min(wt0 + g + 8, last);
  const int wmin = base_pos + min(wt0, last), wmax = base_pos + min(wt0 + 15, last);

  cp_async_wait<1>();  // the queries have landed
  __syncthreads();
  u32 qf[KS][4];
#pragma unroll
  for (int ks = 0; ks < KS; ++ks)
    ldsm_x4(qf[ks], aq + swz(warp * 16 + (lane & 15), ks * 2 + (lane >> 4)), false);

  float acc[NT][4];
#pragma unroll
  for (int n = 0; n < NT; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
  float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.0f, l1 = 0.0f;

  for (int j = 0; j < n_tiles; ++j) {
    const int st = j & 1, k0 = j * PF_BK;
    cp_async_wait<0>();     // K_j and V_j, issued one tile ago, have landed
    __syncthreads();  // for every thread; and tile j - 1's stage is free
    if (j + 1 < n_tiles) {
      load_tile(j + 1, st ^ 1, ak, 0);
      load_tile(j + 1, st ^ 1, av, kv_half);
    }
    cp_async_commit();
    const bool active = k0 <= wmax;  // some key of the tile is visible to this warp
    float sc[SN][4];
    if (active) {
#pragma unroll
      for (int n = 0; n < SN; ++n) sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.0f;
      const u32 kst = ak + st * PF_BK * RB;
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
        for (int np = 0; np < SN / 2; ++np) {
          u32 bb[4];
          const int row = np * 16 + ((lane >> 4) << 3) + (lane & 7);
          ldsm_x4(bb, kst + swz(row, ks * 2 + ((lane >> 3) & 1)), false);
          mma16816(sc[2 * np], qf[ks], bb[0], bb[1]);
          mma16816(sc[2 * np + 1], qf[ks], bb[2], bb[3]);
        }
      }
      if (k0 + PF_BK - 1 > wmin) {  // the tile crosses the diagonal of some row
#pragma unroll
        for (int n = 0; n < SN; ++n) {
          const int key = k0 + n * 8 + 2 * tg;
          if (key > pos0) sc[n][0] = NEG_INF;
          if (key + 1 > pos0) sc[n][1] = NEG_INF;
          if (key > pos1) sc[n][2] = NEG_INF;
          if (key + 1 > pos1) sc[n][3] = NEG_INF;
        }
      }
      float mx0 = m0, mx1 = m1;
#pragma unroll
      for (int n = 0; n < SN; ++n) {
        mx0 = fmaxf(mx0, fmaxf(sc[n][0], sc[n][1]));
        mx1 = fmaxf(mx1, fmaxf(sc[n][2], sc[n][3]));
      }
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
      const float b0 = mx0 == NEG_INF ? 0.0f : mx0 * scale_log2;
      const float b1 = mx1 == NEG_INF ? 0.0f : mx1 * scale_log2;
      const float a0 = ex2(m0 * scale_log2 - b0), a1 = ex2(m1 * scale_log2 - b1);
      m0 = mx0, m1 = mx1;
      l0 *= a0, l1 *= a1;
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        acc[n][0] *= a0, acc[n][1] *= a0;
        acc[n][2] *= a1, acc[n][3] *= a1;
      }
#pragma unroll
      for (int n = 0; n < SN; ++n) {
        sc[n][0] = ex2(fmaf(sc[n][0], scale_log2, -b0));
        sc[n][1] = ex2(fmaf(sc[n][1], scale_log2, -b0));
        sc[n][2] = ex2(fmaf(sc[n][2], scale_log2, -b1));
        sc[n][3] = ex2(fmaf(sc[n][3], scale_log2, -b1));
        l0 += sc[n][0] + sc[n][1];
        l1 += sc[n][2] + sc[n][3];
      }
    }
    if (active) {
      const u32 vst = av + st * PF_BK * RB;
#pragma unroll
      for (int ks = 0; ks < PF_BK / 16; ++ks) {
        const u32 a[4] = {pack_bf16(sc[2 * ks][0], sc[2 * ks][1]),
                          pack_bf16(sc[2 * ks][2], sc[2 * ks][3]),
                          pack_bf16(sc[2 * ks + 1][0], sc[2 * ks + 1][1]),
                          pack_bf16(sc[2 * ks + 1][2], sc[2 * ks + 1][3])};
#pragma unroll
        for (int dp = 0; dp < DP / 16; ++dp) {
          u32 bb[4];
          const int row = ks * 16 + (((lane >> 3) & 1) << 3) + (lane & 7);
          ldsm_x4(bb, vst + swz(row, dp * 2 + (lane >> 4)), true);
          mma16816(acc[2 * dp], a, bb[0], bb[1]);
          mma16816(acc[2 * dp + 1], a, bb[2], bb[3]);
        }
      }
    }
  }
  cp_async_wait<0>();

  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  const int hh = hc0 + warp % hpb;
  if (hh >= group) return;
  const float inv0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, inv1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
  const int head = kvh * group + hh;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int tk = wt0 + g + 8 * half;
    if (tk > last) continue;
    const float inv = half ? inv1 : inv0;
    u32* dst = (u32*)(out + ((long long)(q0 + tk) * heads + head) * D);
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      const int d = n * 8 + 2 * tg;
      if (d < D) dst[d >> 1] = pack_bf16(acc[n][2 * half] * inv, acc[n][2 * half + 1] * inv);
    }
  }
}

#define PREFILL_INSTANCE(DP)                                                                   \
  extern "C" __global__ void __maxnreg__(160) paged_prefill_d##DP(                     \
      const bf16_t* q, const bf16_t* kv, const int* query_start, const int* seq_lens,          \
      const int* block_tables, bf16_t* out, int num_seqs, int heads, int kv_heads, int D,      \
      int block_size, int max_blocks, long long kv_half, int hpb, int tt, float scale_log2) { pdl_start(); \
    prefill_attention<DP>(q, kv, query_start, seq_lens, block_tables, out, num_seqs, heads,    \
                          kv_heads, D, block_size, max_blocks, kv_half, hpb, tt, scale_log2);  \
  }
PREFILL_INSTANCE(16)
PREFILL_INSTANCE(32)
PREFILL_INSTANCE(64)
PREFILL_INSTANCE(128)
