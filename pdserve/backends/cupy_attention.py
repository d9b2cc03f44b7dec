"""Paged attention on the GPU: plans the launch of csrc/attention.cu for one forward batch.

The grid is sized from the batch's host copies of its lengths when it has them, and from upper
bounds otherwise, so planning never reads device memory.
"""

from __future__ import annotations

import cupy as cp
import numpy as np

from pdserve.backends.cupy_kernels import BF16, Kernels, row_major
from pdserve.model.forward_batch import ForwardBatch

KEY_TILE = 16  # ATT_BK in csrc/attention.cu
THREADS = 128
MAX_ROW_ELEMS = 4096  # query rows x head_dim a block holds (128 threads x 32 accumulators)
MAX_SPLITS = 32


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _plan_splits(k: Kernels, blocks: int, max_context: int, min_split_keys: int) -> int:
    """Splits of the key range: enough blocks to fill the GPU twice over, no split shorter
    than `min_split_keys` keys."""
    by_len = _cdiv(max_context, max(min_split_keys, KEY_TILE))
    by_fill = _cdiv(2 * k.num_sms, max(blocks, 1))
    return max(1, min(by_len, by_fill, MAX_SPLITS))


def paged_attention(
    k: Kernels,
    q: cp.ndarray,
    kv_layer: cp.ndarray,
    batch: ForwardBatch,
    scale: float,
    min_split_keys: int = 256,
) -> cp.ndarray:
    """Causal GQA attention of q [T, heads, D] over the paged KV of each sequence: [T, heads, D]
    bf16. A batch of decode tokens only (T == S) takes one query per block, and long contexts
    split their keys over several blocks."""
    t, heads, d = q.shape
    kv_heads, block_size = kv_layer.shape[3], kv_layer.shape[2]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not divide into {kv_heads} KV heads")
    group = heads // kv_heads
    if group * d > MAX_ROW_ELEMS:
        raise ValueError(f"a KV group of {group} heads of dim {d} exceeds the attention kernel")
    if not kv_layer.flags.c_contiguous:
        raise ValueError("the KV layer must be contiguous [2, blocks, block_size, kv_heads, D]")
    q = row_major(q)
    num_seqs = int(batch.seq_lens.shape[0])
    starts, lens = batch.query_start_loc_host, batch.seq_lens_host
    bq = 1 if t == num_seqs else max(1, min(64, MAX_ROW_ELEMS // d) // group)
    if starts is not None:
        tiles = sum(_cdiv(b - a, bq) for a, b in zip(starts[:-1], starts[1:]))
    else:
        tiles = _cdiv(t, bq) + num_seqs
    max_context = max(lens) if lens else batch.block_tables.shape[1] * block_size
    splits = _plan_splits(k, tiles * kv_heads, max_context, min_split_keys)
    split_keys = _cdiv(_cdiv(max_context, splits), KEY_TILE) * KEY_TILE

    out = k.empty((t, heads, d), BF16)
    if splits > 1:
        part_o = k.empty((splits, t, heads, d), np.float32)
        part_ml = k.empty((splits, t, heads, 2), np.float32)
    else:
        part_o = part_ml = out  # not touched
    rows = bq * group
    shared = 4 * (rows * d + KEY_TILE * (2 * d + 1) + rows * KEY_TILE + 3 * rows)
    tables = batch.block_tables
    args = (
        q, kv_layer,
        row_major(batch.query_start_loc, np.int32), row_major(batch.seq_lens, np.int32),
        row_major(tables, np.int32), out, part_o, part_ml,
        num_seqs, t, heads, kv_heads, d, block_size, tables.shape[1],
        np.int64(kv_layer[0].size), bq, split_keys, float(scale),
    )  # fmt: skip
    k.launch("attention.cu", "paged_attention", (tiles, kv_heads, splits), THREADS, args, shared)
    if splits > 1:
        k.launch("attention.cu", "attention_combine", (t * heads,), 128,
                 (part_o, part_ml, out, t * heads, d, splits))  # fmt: skip
    return out
