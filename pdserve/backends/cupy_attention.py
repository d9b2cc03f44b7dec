"""Paged attention on the GPU: plans the launches of csrc/attention.cu (decode rows) and
csrc/attention_prefill.cu (prefill chunks) for one forward batch.

A sequence with one new token is a decode row; two or more make a prefill chunk. A mixed batch
launches both kernels, each skipping the other's sequences on the device. Planning never reads
device memory: with the batch's host lengths it sizes grids exactly; without them (a decode
batch captured in a CUDA graph) it uses only shapes (T tokens, S sequences, the block-table
width), and the decode kernel spreads each sequence's real length over the planned splits.
"""

from __future__ import annotations

import cupy as cp
import numpy as np

from pdserve.backends.cupy_kernels import BF16, Kernels, row_major
from pdserve.model.forward_batch import ForwardBatch

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 128
HEAD_DIMS = (16, 32, 64, 128)  # the kernels' instances; head dims are padded up to one
# csrc/attention.cu
DECODE_WARPS = 4
DECODE_TILE_KEYS = 16
DECODE_STAGES = 3
DECODE_MIN_KEYS = DECODE_WARPS * DECODE_TILE_KEYS  # keys a split gets at least
DECODE_HEADS = 8  # query heads per block at most (the n of mma.m16n8k16)
MAX_SPLITS = 128
COMBINE_THREADS = 256
# csrc/attention_prefill.cu
PREFILL_TILE_KEYS = 64
# warps per block the planner aims for (16 query rows each); at most 8. The kernel is capped at
# 160 registers a thread (3 warps per SM sub-partition, so two 5-warp blocks per SM): 8k-token
# prefill attention 2.89 -> 1.89 ms a layer on the H200 against the uncapped 200
PREFILL_MAX_WARPS = 8


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def decode_splits(num_sms: int, blocks: int, max_context: int) -> int:
    """Key splits per decode row: enough blocks to fill the GPU twice over (`blocks` is rows x
    KV heads x head chunks), never more than one split per DECODE_MIN_KEYS keys of the longest
    possible context (the kernel gives every split at least that many: a 16-key tile for each
    of its warps)."""
    by_fill = _cdiv(2 * num_sms, max(blocks, 1))
    by_len = _cdiv(max(max_context, 1), DECODE_MIN_KEYS)
    return max(1, min(by_fill, by_len, MAX_SPLITS))


def _check(q: cp.ndarray, kv_layer: cp.ndarray) -> None:
    heads, d = q.shape[1], q.shape[2]
    kv_heads = kv_layer.shape[3]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not divide into {kv_heads} KV heads")
    if d % 8 or d > MAX_HEAD_DIM:
        raise ValueError(f"head dim {d}: the attention kernels take multiples of 8 up to 128")
    if kv_layer.dtype != BF16 or not kv_layer.flags.c_contiguous or kv_layer.data.ptr % 16:
        raise ValueError("the KV layer must be bf16, contiguous [2, blocks, block_size, kv_heads,"
                         " D] and 16-byte aligned")  # fmt: skip


def paged_attention(
    k: Kernels,
    q: cp.ndarray,
    kv_layer: cp.ndarray,
    batch: ForwardBatch,
    scale: float,
) -> cp.ndarray:
    """Causal GQA attention of q [T, heads, D] over the paged KV of each sequence: [T, heads, D]
    bf16. Decode splits are planned to fill the GPU; the prefill kernel does not split keys."""
    _check(q, kv_layer)
    t, heads, d = q.shape
    kv_heads, block_size = kv_layer.shape[3], kv_layer.shape[2]
    group = heads // kv_heads
    num_seqs = int(batch.seq_lens.shape[0])
    q = row_major(q)
    tables = row_major(batch.block_tables, np.int32)
    starts_dev = row_major(batch.query_start_loc, np.int32)
    lens_dev = row_major(batch.seq_lens, np.int32)
    out = k.empty((t, heads, d), BF16)
    if t == 0:
        return out

    starts, lens = batch.query_start_loc_host, batch.seq_lens_host
    q_lens = [b - a for a, b in zip(starts[:-1], starts[1:])] if starts is not None else None
    common = (tables, np.int64(kv_layer[0].size), float(scale * LOG2E))
    hpb = min(group, PREFILL_MAX_WARPS)
    tt = max(1, PREFILL_MAX_WARPS // hpb)
    if q_lens is None:
        # shapes only: T == S is a decode batch (the CUDA-graph case); otherwise anything goes
        prefill_tiles = 0 if t == num_seqs else _cdiv(t, 16 * tt) + num_seqs
        decode_rows = num_seqs
    else:
        prefill_tiles = sum(_cdiv(n, 16 * tt) for n in q_lens if n >= 2)
        decode_rows = sum(1 for n in q_lens if n == 1)
    if prefill_tiles:
        _launch_prefill(k, q, kv_layer, starts_dev, lens_dev, out, common, prefill_tiles, hpb, tt)
    if decode_rows:
        if lens is not None and q_lens is not None:
            max_context = max(c for c, n in zip(lens, q_lens) if n == 1)
        else:
            max_context = tables.shape[1] * block_size
        _launch_decode(k, q, kv_layer, starts_dev, lens_dev, out, common, decode_rows,
                       max_context)  # fmt: skip
    return out


def _launch_prefill(
    k: Kernels,
    q: cp.ndarray,
    kv_layer: cp.ndarray,
    starts: cp.ndarray,
    lens: cp.ndarray,
    out: cp.ndarray,
    common: tuple,
    tiles: int,
    hpb: int,
    tt: int,
) -> None:
    t, heads, d = q.shape
    kv_heads, block_size = kv_layer.shape[3], kv_layer.shape[2]
    tables, kv_half, scale_log2 = common
    dp = next(x for x in HEAD_DIMS if x >= d)
    warps = hpb * tt
    chunks = _cdiv(heads // kv_heads, hpb)
    shared = (warps * 16 + 4 * PREFILL_TILE_KEYS) * dp * 2  # queries, 2 stages of K and V
    args = (q, kv_layer, starts, lens, tables, out, int(lens.shape[0]), heads, kv_heads, d,
            block_size, tables.shape[1], kv_half, hpb, tt, scale_log2)  # fmt: skip
    k.launch("attention_prefill.cu", f"paged_prefill_d{dp}", (tiles, kv_heads * chunks),
             32 * warps, args, shared)  # fmt: skip


def _launch_decode(
    k: Kernels,
    q: cp.ndarray,
    kv_layer: cp.ndarray,
    starts: cp.ndarray,
    lens: cp.ndarray,
    out: cp.ndarray,
    common: tuple,
    decode_rows: int,
    max_context: int,
) -> None:
    t, heads, d = q.shape
    kv_heads, block_size = kv_layer.shape[3], kv_layer.shape[2]
    tables, kv_half, scale_log2 = common
    num_seqs = int(lens.shape[0])
    y = kv_heads * _cdiv(heads // kv_heads, DECODE_HEADS)
    splits = decode_splits(k.num_sms, decode_rows * y, max_context)
    dp = next(x for x in HEAD_DIMS if x >= d)
    shared = DECODE_WARPS * DECODE_STAGES * 2 * DECODE_TILE_KEYS * dp * 2  # the warps' rings
    if splits > 1:
        part_o = k.empty((splits, num_seqs, heads, d), np.float32)
        part_ml = k.empty((splits, num_seqs, heads, 2), np.float32)
    else:
        part_o = part_ml = out  # not touched
    args = (q, kv_layer, starts, lens, tables, out, part_o, part_ml, heads, kv_heads, d,
            block_size, tables.shape[1], kv_half, scale_log2)  # fmt: skip
    k.launch("attention.cu", f"paged_decode_d{dp}", (num_seqs, y, splits), 32 * DECODE_WARPS,
             args, shared)  # fmt: skip
    if splits > 1:
        k.launch("attention.cu", "decode_combine", (num_seqs * heads,), COMBINE_THREADS,
                 (part_o, part_ml, starts, out, num_seqs, heads, d, splits))  # fmt: skip
