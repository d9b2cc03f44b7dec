// Causal GQA attention over the paged KV cache, flash-style (online softmax, the score matrix
// never reaches device memory), for prefill chunks and decode tokens alike.
//
// A block owns one query tile of one sequence (up to bq consecutive tokens), one KV head and
// every query head of its group, and one split of the keys. Token j of a chunk of q_len tokens
// sits at position seq_len - q_len + j and sees keys 0..that position; a tile's earlier tokens
// see fewer keys than its last one, which the mask handles. With more than one split (long
// contexts, few blocks), each block writes unnormalised partial results that
// attention_combine merges.
//
// Version 1 computes on CUDA cores with float32 shared-memory tiles; the tensor-core version
// replaces the two inner products.
#include "common.cuh"

#define ATT_THREADS 128
#define ATT_BK 16            // keys per tile
#define ATT_MAX_PER_THREAD 32  // output accumulators per thread: rows * D <= 4096

extern "C" __global__ void __launch_bounds__(ATT_THREADS) paged_attention(
    const bf16_t* __restrict__ q,           // [T, heads, D]
    const bf16_t* __restrict__ kv,          // one layer [2, blocks, block_size, kv_heads, D]
    const int* __restrict__ query_start,    // [S + 1]
    const int* __restrict__ seq_lens,       // [S]
    const int* __restrict__ block_tables,   // [S, max_blocks]
    bf16_t* __restrict__ out,               // [T, heads, D] (one split)
    float* __restrict__ part_o,             // [splits, T, heads, D] (several splits)
    float* __restrict__ part_ml,            // [splits, T, heads, 2]: running max, sum
    int num_seqs, int num_tokens, int heads, int kv_heads, int D, int block_size,
    int max_blocks, long long kv_half, int bq, int split_keys, float scale) {
  extern __shared__ float smem[];
  const int tid = threadIdx.x;
  const int group = heads / kv_heads, rows_alloc = bq * group;
  float* qs = smem;                          // [rows_alloc][D], pre-scaled
  float* ks = qs + rows_alloc * D;           // [BK][D + 1] (padded: threads walk keys)
  float* vs = ks + ATT_BK * (D + 1);         // [BK][D]
  float* ss = vs + ATT_BK * D;               // [rows_alloc][BK] scores, then probabilities
  float* row_m = ss + rows_alloc * ATT_BK;   // running max per row
  float* row_l = row_m + rows_alloc;         // running sum per row
  float* row_a = row_l + rows_alloc;         // this tile's rescale factor per row

  // which sequence and query tile this block owns
  int s = -1, tile = 0;
  for (int i = 0, seen = 0; i < num_seqs; ++i) {
    const int n = (query_start[i + 1] - query_start[i] + bq - 1) / bq;
    if ((int)blockIdx.x < seen + n) {
      s = i;
      tile = blockIdx.x - seen;
      break;
    }
    seen += n;
  }
  if (s < 0) return;  // grid sized by an upper bound

  const int kvh = blockIdx.y, split = blockIdx.z, splits = gridDim.z;
  const int q0 = query_start[s], q_len = query_start[s + 1] - q0;
  const int i0 = tile * bq, nq = min(bq, q_len - i0), rows = nq * group;
  const int first_pos = seq_lens[s] - q_len + i0;
  const int k_begin = split * split_keys;
  const int k_end = min(first_pos + nq, k_begin + split_keys);
  const int* table = block_tables + (long long)s * max_blocks;

  // row r is query token i0 + r / group, head kvh * group + r % group
  for (int i = tid; i < rows * D; i += ATT_THREADS) {
    const int r = i / D, d = i - r * D;
    const long long tok = q0 + i0 + r / group;
    qs[i] = bf2f(q[(tok * heads + kvh * group + r % group) * D + d]) * scale;
  }
  for (int r = tid; r < rows_alloc; r += ATT_THREADS) {
    row_m[r] = NEG_INF;
    row_l[r] = 0.0f;
  }
  float acc[ATT_MAX_PER_THREAD];
#pragma unroll
  for (int j = 0; j < ATT_MAX_PER_THREAD; ++j) acc[j] = 0.0f;
  __syncthreads();

  for (int k0 = k_begin; k0 < k_end; k0 += ATT_BK) {
    for (int i = tid; i < ATT_BK * D; i += ATT_THREADS) {
      const int c = i / D, d = i - c * D, key = k0 + c;
      float kf = 0.0f, vf = 0.0f;
      if (key < k_end) {
        const long long blk = table[key / block_size];
        const long long a = ((blk * block_size + key % block_size) * kv_heads + kvh) * D + d;
        kf = bf2f(kv[a]);
        vf = bf2f(kv[kv_half + a]);
      }
      ks[c * (D + 1) + d] = kf;
      vs[c * D + d] = vf;
    }
    __syncthreads();
    for (int i = tid; i < rows * ATT_BK; i += ATT_THREADS) {
      const int r = i / ATT_BK, c = i - r * ATT_BK, key = k0 + c;
      float sc = NEG_INF;
      if (key < k_end && key <= first_pos + r / group) {
        const float* qr = qs + r * D;
        const float* kr = ks + c * (D + 1);
        sc = 0.0f;
        for (int d = 0; d < D; ++d) sc += qr[d] * kr[d];
      }
      ss[i] = sc;
    }
    __syncthreads();
    for (int r = tid; r < rows; r += ATT_THREADS) {
      float* sr = ss + r * ATT_BK;
      float mt = NEG_INF;
      for (int c = 0; c < ATT_BK; ++c) mt = fmaxf(mt, sr[c]);
      const float m_old = row_m[r], m_new = fmaxf(m_old, mt);
      float alpha = 1.0f, sum = 0.0f;
      if (m_new == NEG_INF) {  // nothing visible yet
        for (int c = 0; c < ATT_BK; ++c) sr[c] = 0.0f;
      } else {
        alpha = expf(m_old - m_new);
        for (int c = 0; c < ATT_BK; ++c) {
          const float p = expf(sr[c] - m_new);
          sr[c] = p;
          sum += p;
        }
      }
      row_l[r] = row_l[r] * alpha + sum;
      row_m[r] = m_new;
      row_a[r] = alpha;
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < ATT_MAX_PER_THREAD; ++j) {
      const int i = tid + j * ATT_THREADS;
      if (i < rows * D) {
        const int r = i / D, d = i - r * D;
        const float* pr = ss + r * ATT_BK;
        float a = acc[j] * row_a[r];
        for (int c = 0; c < ATT_BK; ++c) a += pr[c] * vs[c * D + d];
        acc[j] = a;
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int j = 0; j < ATT_MAX_PER_THREAD; ++j) {
    const int i = tid + j * ATT_THREADS;
    if (i < rows * D) {
      const int r = i / D, d = i - r * D;
      const long long tok = q0 + i0 + r / group;
      const long long th = tok * heads + kvh * group + r % group;
      const float l = row_l[r];
      if (splits == 1) {
        out[th * D + d] = f2bf(l > 0.0f ? acc[j] / l : 0.0f);
      } else {
        const long long p = (long long)split * num_tokens * heads + th;
        part_o[p * D + d] = acc[j];
        if (d == 0) {
          part_ml[2 * p] = row_m[r];
          part_ml[2 * p + 1] = l;
        }
      }
    }
  }
}

// out[t, h] = sum_z o_z e^(m_z - M) / sum_z l_z e^(m_z - M) over the splits z, M = max_z m_z.
// One block per (token, head).
extern "C" __global__ void attention_combine(const float* __restrict__ part_o,
                                             const float* __restrict__ part_ml,
                                             bf16_t* __restrict__ out, int num_rows, int D,
                                             int splits) {
  const long long th = blockIdx.x;  // token * heads + head; num_rows = T * heads
  float M = NEG_INF;
  for (int z = 0; z < splits; ++z) M = fmaxf(M, part_ml[2 * (z * (long long)num_rows + th)]);
  float L = 0.0f;
  for (int z = 0; z < splits; ++z) {
    const long long p = z * (long long)num_rows + th;
    if (part_ml[2 * p] != NEG_INF) L += part_ml[2 * p + 1] * expf(part_ml[2 * p] - M);
  }
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float o = 0.0f;
    for (int z = 0; z < splits; ++z) {
      const long long p = z * (long long)num_rows + th;
      const float m = part_ml[2 * p];
      if (m != NEG_INF) o += part_o[p * D + d] * expf(m - M);
    }
    out[th * D + d] = f2bf(L > 0.0f ? o / L : 0.0f);
  }
}
