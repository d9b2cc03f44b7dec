// Interleaved rotary embedding and the KV-cache write by slot mapping.
#include "common.cuh"

// Rotates pairs (2i, 2i+1) of every head by pos * inv_freq[i], in float32.
// x: [T, heads, D] bf16 with row stride x_row and head stride x_head (elements), unit stride
// inside a head; pos: [T] int64; inv_freq: [D/2] float32; out: [T, heads, D] bf16, contiguous.
// One block per token.
extern "C" __global__ void rope(const bf16_t* __restrict__ x, long long x_row, long long x_head,
                                const long long* __restrict__ pos,
                                const float* __restrict__ inv_freq, bf16_t* __restrict__ out,
                                int heads, int D) {
  pdl_start();
  const int t = blockIdx.x, half = D >> 1;
  const float p = (float)pos[t];
  for (int idx = threadIdx.x; idx < heads * half; idx += blockDim.x) {
    const int h = idx / half, i = idx - h * half;
    const bf16_t* src = x + t * x_row + h * x_head + 2 * i;
    store_rotated(out + ((long long)t * heads + h) * D + 2 * i, bf2f(src[0]), bf2f(src[1]),
                  p * inv_freq[i]);
  }
}

// kv[0, slot] = k[t], kv[1, slot] = v[t] where slot = block * block_size + offset.
// k, v: [T, kv_heads, D] bf16 with row strides k_row, v_row (contiguous inside a row);
// slots: [T] int64 (negative: padding, skipped); kv: one layer [2, blocks, block_size,
// kv_heads, D] bf16 whose halves are kv_half elements apart. One block per token.
extern "C" __global__ void write_kv(const bf16_t* __restrict__ k, long long k_row,
                                    const bf16_t* __restrict__ v, long long v_row,
                                    const long long* __restrict__ slots,
                                    bf16_t* __restrict__ kv, long long kv_half, int row_elems) {
  pdl_start();
  const int t = blockIdx.x;
  const long long slot = slots[t];
  if (slot < 0) return;
  bf16_t* dk = kv + slot * row_elems;
  bf16_t* dv = dk + kv_half;
  for (int i = threadIdx.x; i < row_elems; i += blockDim.x) {
    dk[i] = k[t * k_row + i];
    dv[i] = v[t * v_row + i];
  }
}

// The two above fused for a qkv projection's output: q_out[t] = rope(q[t]), kv[0, slot] =
// rope(k[t]), kv[1, slot] = v[t], rounding exactly as `rope` then `write_kv` do.
// qkv: [T, (heads + 2 kv_heads) * D] bf16 rows (q | k | v) of stride `row` elements; pos,
// inv_freq, slots (negative: padding, no KV written) and kv as above; q_out: [T, heads, D] bf16.
// One block per token.
extern "C" __global__ void rope_qkv_write_kv(const bf16_t* __restrict__ qkv, long long row,
                                             const long long* __restrict__ pos,
                                             const float* __restrict__ inv_freq,
                                             bf16_t* __restrict__ q_out,
                                             const long long* __restrict__ slots,
                                             bf16_t* __restrict__ kv, long long kv_half,
                                             int heads, int kv_heads, int D) {
  pdl_start();
  const int t = blockIdx.x, half = D >> 1;
  const float p = (float)pos[t];
  const long long slot = slots[t];
  const bf16_t* src = qkv + t * row;
  bf16_t* dk = kv + slot * kv_heads * D;  // only touched when slot >= 0
  for (int idx = threadIdx.x; idx < (heads + kv_heads) * half; idx += blockDim.x) {
    const int h = idx / half, i = idx - h * half;
    bf16_t* dst;
    if (h < heads) {
      dst = q_out + ((long long)t * heads + h) * D + 2 * i;
    } else if (slot >= 0) {
      dst = dk + (h - heads) * D + 2 * i;
    } else {
      continue;
    }
    store_rotated(dst, bf2f(src[h * D + 2 * i]), bf2f(src[h * D + 2 * i + 1]), p * inv_freq[i]);
  }
  if (slot < 0) return;
  const bf16_t* v = src + (heads + kv_heads) * D;
  for (int i = threadIdx.x; i < kv_heads * D; i += blockDim.x) dk[kv_half + i] = v[i];
}
