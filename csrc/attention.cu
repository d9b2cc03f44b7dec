// Decode attention over the paged KV cache, on tensor cores: every sequence handled here has one
// new token, which sees all of its seq_len keys. Prefill chunks (two or more new tokens) are
// attention_prefill.cu's.
//
// One block per (sequence, KV head, key split) computes up to 8 query heads of the KV head's GQA
// group at once (larger groups take several blocks), so each K/V row is read from memory once.
// The number of splits is the grid's z size, chosen by the host from shapes only; the key range
// of each split comes from the sequence's length on the device, so a batch captured in a CUDA
// graph spreads any length over all of its splits. A split with no keys writes a neutral partial
// (m = -inf, l = 0) that decode_combine ignores.
//
// The products are transposed so that keys, not the few query heads, fill the 16 rows of
// mma.m16n8k16: S^T [16 keys x 8 heads] = K Q^T, then O^T [D x 8 heads] += V^T P^T, with P^T
// moved from the accumulator layout into B fragments by movmatrix.trans. The block's 4 warps
// take turns over 16-key tiles of the split; each warp streams its tiles through a private
// 3-stage cp.async ring (16-byte copies, rows XOR-swizzled for ldmatrix) and runs its own online
// softmax, with no block barrier until the warps merge at the end. Scores are kept in log2
// units, so every exponential is one ex2.
#include "ptx.cuh"

#define DEC_WARPS 4
#define DEC_KT 16      // keys per warp tile
#define DEC_STAGES 3   // per-warp cp.async ring depth
#define DEC_GRANULE 16 // split boundaries fall on multiples of this many keys
#define DEC_MAX_SPLITS 128

struct alignas(16) f32x4 {
  float x, y, z, w;
};

template <int DP>  // head dim padded to a multiple of 16; pieces past D load as zeros
__device__ __forceinline__ void decode_attention(
    const bf16_t* __restrict__ q,          // [T, heads, D]
    const bf16_t* __restrict__ kv,         // one layer [2, blocks, block_size, kv_heads, D]
    const int* __restrict__ query_start,   // [S + 1]
    const int* __restrict__ seq_lens,      // [S]
    const int* __restrict__ block_tables,  // [S, max_blocks]
    bf16_t* __restrict__ out,              // [T, heads, D], written when gridDim.z == 1
    float* __restrict__ part_o,            // [splits, S, heads, D], relative to part m
    float* __restrict__ part_ml,           // [splits, S, heads, 2]: max (log2 units), sum
    int heads, int kv_heads, int D, int block_size, int max_blocks, long long kv_half,
    float scale_log2) {
  constexpr int CH = DP / 8, SWZ = CH < 8 ? CH - 1 : 7, RB = DP * 2, KS = DP / 16;
  constexpr int TILE = DEC_KT * RB;  // bytes of one K (or V) tile
  extern __shared__ u32x4 smem_v4[];
  unsigned char* smem = (unsigned char*)smem_v4;
  const int s = blockIdx.x, num_seqs = gridDim.x, z = blockIdx.z, splits = gridDim.z;
  const int tok = query_start[s];
  if (query_start[s + 1] - tok != 1) return;  // not a decode row (uniform over the block)
  const int group = heads / kv_heads, chunks = (group + 7) / 8;
  const int kvh = blockIdx.y / chunks, h0 = (blockIdx.y - kvh * chunks) * 8;
  const int nh = min(8, group - h0);
  const int len = seq_lens[s];
  // at least a tile for every warp: a short sequence in a graph planned for long ones leaves
  // the later splits empty (cheap) rather than spreading a few keys over all of them
  const int per = max(DEC_WARPS * DEC_KT,
                      ((len + splits - 1) / splits + DEC_GRANULE - 1) / DEC_GRANULE * DEC_GRANULE);
  const int k_begin = z * per, k_end = min(len, k_begin + per);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, tg = lane & 3;

  // Q^T as B fragments: b0 = q[head g][16 ks + 2 tg, +1], b1 the same 8 dims further
  u32 qb[KS][2];
  const bf16_t* qrow = q + ((long long)tok * heads + kvh * group + h0 + g) * D;
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int d = ks * 16 + j * 8 + 2 * tg;
      qb[ks][j] = g < nh && d < D ? *(const u32*)(qrow + d) : 0u;
    }
  }

  const int n_tiles = k_end > k_begin ? (k_end - k_begin + DEC_KT - 1) / DEC_KT : 0;
  const int count = n_tiles > warp ? (n_tiles - warp + DEC_WARPS - 1) / DEC_WARPS : 0;
  const int* table = block_tables + (long long)s * max_blocks;
  const u32 ring = shared_addr(smem) + warp * DEC_STAGES * 2 * TILE;  // [stage][K, V][tile]
  auto swz = [](int row, int piece) { return row * RB + ((piece ^ (row & SWZ)) << 4); };
  auto issue = [&](int i) {  // this warp's i-th tile into ring stage i % STAGES
    const int key0 = k_begin + (warp + i * DEC_WARPS) * DEC_KT;
    const bool one_block = block_size % DEC_KT == 0;  // key0 is a multiple of DEC_KT
    const long long slot0 =
        one_block ? (long long)table[key0 / block_size] * block_size + key0 % block_size : 0;
    const u32 dst = ring + (i % DEC_STAGES) * 2 * TILE;
#pragma unroll
    for (int e = lane; e < DEC_KT * CH; e += 32) {
      const int row = e / CH, pc = e - row * CH, key = key0 + row;
      const bool ok = key < k_end && pc * 8 < D;
      const bf16_t* src = kv;
      if (ok) {
        const long long slot = one_block ? slot0 + row
                                         : (long long)table[key / block_size] * block_size +
                                               key % block_size;
        src = kv + (slot * kv_heads + kvh) * D + pc * 8;
      }
      cp_async16(dst + swz(row, pc), src, ok ? 16 : 0);
      cp_async16(dst + TILE + swz(row, pc), src + kv_half, ok ? 16 : 0);
    }
  };

#pragma unroll
  for (int i = 0; i < DEC_STAGES - 1; ++i) {
    if (i < count) issue(i);
    cp_async_commit();
  }
  // this thread's heads are 2 tg and 2 tg + 1; O^T rows (dims) 16 mt + g and + 8
  float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.0f, l1 = 0.0f;
  float o[KS][4];
#pragma unroll
  for (int mt = 0; mt < KS; ++mt) o[mt][0] = o[mt][1] = o[mt][2] = o[mt][3] = 0.0f;
  for (int i = 0; i < count; ++i) {
    cp_async_wait<DEC_STAGES - 2>();
    __syncwarp();  // every lane's copies of tile i have landed; tile i - 1 is consumed
    if (i + DEC_STAGES - 1 < count) issue(i + DEC_STAGES - 1);
    cp_async_commit();
    const u32 kst = ring + (i % DEC_STAGES) * 2 * TILE, vst = kst + TILE;
    float sc[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // S^T: keys g, g + 8 x heads 2 tg, 2 tg + 1
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      u32 a[4];
      ldsm_x4(a, kst + swz(lane & 15, ks * 2 + (lane >> 4)), false);
      mma16816(sc, a, qb[ks][0], qb[ks][1]);
    }
    const int key = k_begin + (warp + i * DEC_WARPS) * DEC_KT + g;
    const float s0 = key < k_end ? sc[0] * scale_log2 : NEG_INF;
    const float s1 = key < k_end ? sc[1] * scale_log2 : NEG_INF;
    const float s2 = key + 8 < k_end ? sc[2] * scale_log2 : NEG_INF;
    const float s3 = key + 8 < k_end ? sc[3] * scale_log2 : NEG_INF;
    float mx0 = fmaxf(s0, s2), mx1 = fmaxf(s1, s3);
#pragma unroll
    for (int off = 4; off < 32; off <<= 1) {  // over the 8 lanes of each head pair
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
    }
    mx0 = fmaxf(mx0, m0), mx1 = fmaxf(mx1, m1);  // finite: key 0 of the tile is in range
    const float a0 = ex2(m0 - mx0), a1 = ex2(m1 - mx1);
    const float p0 = ex2(s0 - mx0), p1 = ex2(s1 - mx1), p2 = ex2(s2 - mx0), p3 = ex2(s3 - mx1);
    m0 = mx0, m1 = mx1;
    l0 = l0 * a0 + p0 + p2, l1 = l1 * a1 + p1 + p3;
    const u32 pb0 = transpose8x8(pack_bf16(p0, p1)), pb1 = transpose8x8(pack_bf16(p2, p3));
#pragma unroll
    for (int mt = 0; mt < KS; ++mt) {
      o[mt][0] *= a0, o[mt][1] *= a1, o[mt][2] *= a0, o[mt][3] *= a1;
      u32 a[4];
      ldsm_x4(a, vst + swz(((lane >> 4) << 3) + (lane & 7), mt * 2 + ((lane >> 3) & 1)), true);
      mma16816(o[mt], a, pb0, pb1);
    }
  }
  cp_async_wait<0>();
#pragma unroll
  for (int off = 4; off < 32; off <<= 1) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, off);
    l1 += __shfl_xor_sync(0xffffffffu, l1, off);
  }
  __syncthreads();  // the rings become the warps' merge area

  float* so = (float*)smem;                  // [warps][8 heads][DP]
  float* sml = so + DEC_WARPS * 8 * DP;      // [warps][8 heads][2]
  float* mine = so + warp * 8 * DP;
#pragma unroll
  for (int mt = 0; mt < KS; ++mt) {
    mine[(2 * tg) * DP + mt * 16 + g] = o[mt][0];
    mine[(2 * tg + 1) * DP + mt * 16 + g] = o[mt][1];
    mine[(2 * tg) * DP + mt * 16 + g + 8] = o[mt][2];
    mine[(2 * tg + 1) * DP + mt * 16 + g + 8] = o[mt][3];
  }
  if (g == 0) {
    float* ml = sml + (warp * 8 + 2 * tg) * 2;
    ml[0] = m0, ml[1] = l0, ml[2] = m1, ml[3] = l1;
  }
  __syncthreads();
  for (int i = tid; i < nh * D; i += DEC_WARPS * 32) {
    const int h = i / D, d = i - h * D;
    float M = NEG_INF;
#pragma unroll
    for (int w = 0; w < DEC_WARPS; ++w) M = fmaxf(M, sml[(w * 8 + h) * 2]);
    float L = 0.0f, O = 0.0f;
    if (M != NEG_INF) {
#pragma unroll
      for (int w = 0; w < DEC_WARPS; ++w) {
        const float wt = ex2(sml[(w * 8 + h) * 2] - M);
        L += sml[(w * 8 + h) * 2 + 1] * wt;
        O += so[(w * 8 + h) * DP + d] * wt;
      }
    }
    const int head = kvh * group + h0 + h;
    if (splits == 1) {
      out[((long long)tok * heads + head) * D + d] = f2bf(L > 0.0f ? O / L : 0.0f);
    } else {
      const long long p = ((long long)z * num_seqs + s) * heads + head;
      part_o[p * D + d] = O;
      if (d == 0) part_ml[2 * p] = M, part_ml[2 * p + 1] = L;
    }
  }
}

#define DECODE_INSTANCE(DP)                                                                  \
  extern "C" __global__ void __launch_bounds__(DEC_WARPS * 32) paged_decode_d##DP(           \
      const bf16_t* q, const bf16_t* kv, const int* query_start, const int* seq_lens,        \
      const int* block_tables, bf16_t* out, float* part_o, float* part_ml, int heads,        \
      int kv_heads, int D, int block_size, int max_blocks, long long kv_half,                \
      float scale_log2) { pdl_start();                                                       \
    decode_attention<DP>(q, kv, query_start, seq_lens, block_tables, out, part_o, part_ml,   \
                         heads, kv_heads, D, block_size, max_blocks, kv_half, scale_log2);   \
  }
DECODE_INSTANCE(16)
DECODE_INSTANCE(32)
DECODE_INSTANCE(64)
DECODE_INSTANCE(128)
// out[tok(s), h] = sum_z o_z 2^(m_z - M) / sum_z l_z 2^(m_z - M) over the splits z, M = max m_z,
// for every decode row s. One block of 256 threads per (sequence, head): the splits' weights
// first, then each thread sums 16-byte pieces of a slice of the splits.
extern "C" __global__ void __launch_bounds__(256) decode_combine(
    const float* __restrict__ part_o,      // [splits, S, heads, D]
    const float* __restrict__ part_ml,     // [splits, S, heads, 2]
    const int* __restrict__ query_start,   // [S + 1]
    bf16_t* __restrict__ out,              // [T, heads, D]
    int num_seqs, int heads, int D, int splits) {
  pdl_start();
  __shared__ float w[DEC_MAX_SPLITS];
  __shared__ float scratch[32];
  __shared__ f32x4 red[256];
  const int row = blockIdx.x, s = row / heads, h = row - s * heads, tid = threadIdx.x;
  const int tok = query_start[s];
  if (query_start[s + 1] - tok != 1) return;
  const long long rows = (long long)num_seqs * heads;
  float mz = NEG_INF;
  for (int zi = tid; zi < splits; zi += 256) mz = fmaxf(mz, part_ml[2 * (zi * rows + row)]);
  mz = warp_max(mz);
  if ((tid & 31) == 0) scratch[tid >> 5] = mz;
  __syncthreads();
  float M = NEG_INF;
  for (int i = 0; i < 8; ++i) M = fmaxf(M, scratch[i]);
  float lz = 0.0f;
  for (int zi = tid; zi < splits; zi += 256) {
    const float m = part_ml[2 * (zi * rows + row)];
    const float wz = m == NEG_INF ? 0.0f : ex2(m - M);
    w[zi] = wz;
    lz += wz * part_ml[2 * (zi * rows + row) + 1];
  }
  const float L = block_sum(lz, scratch);  // its barriers also publish w[]

  const int dc = D >> 2, piece = tid % dc, zp = tid / dc, nzp = 256 / dc;
  f32x4 acc = {0.0f, 0.0f, 0.0f, 0.0f};
  if (zp < nzp) {
    for (int zi = zp; zi < splits; zi += nzp) {
      const float wz = w[zi];
      if (wz == 0.0f) continue;
      const f32x4 v = ((const f32x4*)(part_o + (zi * rows + row) * D))[piece];
      acc.x += v.x * wz, acc.y += v.y * wz, acc.z += v.z * wz, acc.w += v.w * wz;
    }
  }
  red[tid] = acc;
  __syncthreads();
  if (tid < dc) {
    f32x4 t = red[tid];
    for (int i = 1; i < nzp; ++i) {
      const f32x4 v = red[i * dc + tid];
      t.x += v.x, t.y += v.y, t.z += v.z, t.w += v.w;
    }
    const float inv = L > 0.0f ? 1.0f / L : 0.0f;
    bf16_t* dst = out + ((long long)tok * heads + h) * D + tid * 4;
    dst[0] = f2bf(t.x * inv), dst[1] = f2bf(t.y * inv), dst[2] = f2bf(t.z * inv);
    dst[3] = f2bf(t.w * inv);
  }
}
