"""The experts of a long prefill: pairs grouped by expert, padded into chunks, cuBLAS GEMMs.

At thousands of tokens every expert gets hundreds of rows, so each expert's gate_up and down
projections are real GEMMs. The (token, expert) pairs are grouped by expert on the device and
their counts read back (one device sync a layer, so decode never takes this path: CUDA graphs
cannot capture a sync; only passes of `MIN_TOKENS` tokens or more outside a capture). Then:
- padded (balanced routing): every expert padded to the busiest one's rows, one strided
  batched GEMM per projection;
- chunked (skewed routing): each expert's rows padded to a multiple of `CHUNK_ROWS`, every chunk
  one entry of one pointer-batched GEMM per projection (cublasGemmBatchedEx). All entries have
  one shape, so cuBLAS runs one kernel for all of them and the GPU fills whatever the skew;
  padding wastes less than a chunk an expert.
Both gather the token rows into the padded layout, apply SiLU-mul and combine each token's K
outputs with its routing weights in csrc/moe_chunks.cu, at about the copy rate (together 0.29
ms of a layer's 2.2 at 8192 tokens on the H200). benchmarks/bench_moe_prefill.py measures the
paths; cuBLAS' grouped GEMM (cublasGemmGroupedBatchedEx, 30% of peak) and one GEMM per expert
over side streams (host-bound: 2.7 ms a layer at any size) lost to these at every size and were
removed.
"""

from __future__ import annotations

import cupy as cp
import numpy as np

from pdserve.backends.cublas_capturable import CUDA_R_16BF, current
from pdserve.backends.cupy_kernels import BF16, Kernels
from pdserve.backends.cupy_moe import group_pairs

MIN_TOKENS = 256
# Chunks of 128 rows beat 256 on skewed routing at every size measured (512-8192 tokens, the
# busiest expert 3x the mean): 2.25 vs 2.33 ms a layer at 8192, 0.91 vs 0.96 at 2048.
CHUNK_ROWS = 128
# Padded while padding adds at most this multiple of the real rows: on uniform routing padded
# beats chunks at every size (0.75 vs 0.92 ms at 2048 tokens: an expert's weights are read once,
# not once a chunk), on the skewed routing above it loses from 1024 tokens (5.1 vs 2.25 ms at
# 8192).
MAX_PADDING = 0.5
PATHS = ("auto", "padded", "chunked")


def applies(t: int) -> bool:
    """Whether a pass of t tokens takes this path."""
    return t >= MIN_TOKENS and not cp.cuda.get_current_stream().is_capturing()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def moe_experts(
    k: Kernels, x: cp.ndarray, weights: cp.ndarray, ids: cp.ndarray, gate_up: cp.ndarray,
    down: cp.ndarray, path: str = "auto", chunk: int = CHUNK_ROWS,
) -> cp.ndarray:  # fmt: skip
    """sum_k weights[t, k] * down_e(silu_mul(gate_up_e(x[t]))), e = ids[t, k]: [T, H] bf16.
    x [T, H] bf16, weights [T, K] float32, ids [T, K] int32, gate_up [E, 2I, H] and down
    [E, H, I] bf16, all contiguous. `path` (one of PATHS) and `chunk` (rows) are for tests and
    benchmarks; "padded" falls back to "chunked" where an expert got no pair."""
    if path not in PATHS:
        raise ValueError(f"path {path!r} is not one of {PATHS}")
    t = x.shape[0]
    top_k = ids.shape[1]
    e = gate_up.shape[0]
    pairs = t * top_k
    order, slot_expert, slot_start, slot_count = group_pairs(k, ids, e)  # pairs by expert
    n = slot_expert.size
    meta = cp.asnumpy(cp.concatenate([slot_expert, slot_start, slot_count]))  # the one sync
    touched = meta[:n] >= 0
    experts, starts, ms = meta[:n][touched], meta[n : 2 * n][touched], meta[2 * n :][touched]
    every = len(experts) == e
    if path == "auto":
        path = "padded" if every and ms.max() * e <= (1 + MAX_PADDING) * pairs else "chunked"
    if path == "padded" and every:
        cap = int(ms.max())  # one chunk an expert, in expert order
        return _run(k, x, weights, order, cap, experts, starts, ms, gate_up, down, True)
    per = -(-ms // chunk)  # [n] chunks of each touched expert
    index = np.arange(int(per.sum())) - np.repeat(np.cumsum(per) - per, per)  # within its expert
    first = np.repeat(starts, per) + index * chunk  # [NC] sorted position of each chunk's row 0
    rows = np.minimum(chunk, np.repeat(starts + ms, per) - first)  # [NC] rows holding a pair
    return _run(k, x, weights, order, chunk, np.repeat(experts, per), first, rows, gate_up, down,
                False)  # fmt: skip


def _run(
    k: Kernels, x: cp.ndarray, weights: cp.ndarray, order: cp.ndarray, chunk: int,
    expert: np.ndarray, first: np.ndarray, rows: np.ndarray, gate_up: cp.ndarray,
    down: cp.ndarray, strided: bool,
) -> cp.ndarray:  # fmt: skip
    """The experts over NC chunks of `chunk` padded rows: chunk c holds the pairs
    order[first[c] : first[c] + rows[c]], all of expert[c]. `strided`: chunk c is expert c."""
    t, h = x.shape
    top_k = weights.shape[1]
    inter = gate_up.shape[1] // 2
    nc = len(first)
    r = nc * chunk
    xs = k.empty((r, h), BF16)  # [R, H] token rows, chunk by chunk
    gu = k.empty((r, 2 * inter), BF16)  # [R, 2I]
    act = k.empty((r, inter), BF16)  # [R, I]
    y = k.empty((r, h), BF16)  # [R, H] expert outputs (bf16: the GEMMs output what they read)
    meta = np.concatenate([first, rows]).astype(np.int32)  # [2 * NC]
    if strided:
        dev = cp.asarray(meta)
        at = dev.data.ptr
    else:  # per chunk: x, w, out addresses of the gate_up GEMM, then the down GEMM's
        c = np.arange(nc, dtype=np.int64) * chunk  # [NC] first padded row
        e = expert.astype(np.int64)
        ptrs = [xs.data.ptr + c * 2 * h, gate_up.data.ptr + e * gate_up.strides[0],
                gu.data.ptr + c * 4 * inter, act.data.ptr + c * 2 * inter,
                down.data.ptr + e * down.strides[0], y.data.ptr + c * 2 * h]  # fmt: skip
        dev = cp.asarray(np.concatenate([*ptrs, meta.view(np.int64)]))  # the one upload
        at = dev.data.ptr + 6 * 8 * nc
    pos = k.empty((t * top_k,), np.int32)  # padded row of each (token, k) pair
    k.launch("moe_chunks.cu", "moe_chunk_gather", (_cdiv(r, 8),), 256,
             (x, order, np.uint64(at), np.uint64(at + 4 * nc), xs, pos, r, chunk, h,
              top_k))  # fmt: skip
    blas = current()
    if strided:
        blas.gemm_batched_nt(nc, chunk, 2 * inter, h, xs.data.ptr, h, chunk * h,
                             gate_up.data.ptr, h, 2 * inter * h, gu.data.ptr, 2 * inter,
                             chunk * 2 * inter, CUDA_R_16BF)  # fmt: skip
    else:
        p = dev.data.ptr
        blas.gemm_pointers_nt(nc, chunk, 2 * inter, h, p, h, p + 8 * nc, h, p + 16 * nc,
                              2 * inter, CUDA_R_16BF)  # fmt: skip
    silu_mul(k, gu, act)
    if strided:
        blas.gemm_batched_nt(nc, chunk, h, inter, act.data.ptr, inter, chunk * inter,
                             down.data.ptr, inter, h * inter, y.data.ptr, h, chunk * h,
                             CUDA_R_16BF)  # fmt: skip
    else:
        blas.gemm_pointers_nt(nc, chunk, h, inter, p + 24 * nc, inter, p + 32 * nc, inter,
                              p + 40 * nc, h, CUDA_R_16BF)  # fmt: skip
    return combine(k, y, pos, weights)


def _threads(vectors: int) -> int:
    """A block for a row of `vectors` 16-byte vectors (or elements): whole warps, at most 8."""
    return 32 * min(8, _cdiv(vectors, 32))


def silu_mul(k: Kernels, gu: cp.ndarray, act: cp.ndarray) -> None:
    """act [R, I] = silu(gu[:, :I]) * gu[:, I:], gu [R, 2I] bf16."""
    inter = act.shape[1]
    k.launch("moe_chunks.cu", "silu_mul_rows", (act.shape[0],),
             _threads(inter // 8 if inter % 8 == 0 else inter), (gu, act, inter))  # fmt: skip


def combine(k: Kernels, y: cp.ndarray, pos: cp.ndarray, weights: cp.ndarray) -> cp.ndarray:
    """out [T, H] bf16 = sum_k weights[t, k] * y[pos[t * K + k]]: y [R, H] bf16."""
    t, top_k = weights.shape
    h = y.shape[1]
    out = k.empty((t, h), BF16)
    k.launch("moe_chunks.cu", "moe_chunk_combine", (t,), _threads(h // 8 if h % 8 == 0 else h),
             (y, pos, weights, out, h, top_k))  # fmt: skip
    return out
