"""The experts of a long prefill: pairs grouped by expert, padded into chunks, cuBLAS GEMMs.

At thousands of tokens every expert gets hundreds of rows, so each expert's gate_up and down
projections are real GEMMs. The (token, expert) pairs are counted by expert on the device,
each pair getting its row among its expert's, and the counts read back (one device sync a
layer, so decode never takes this path: CUDA graphs cannot capture a sync; only passes of
`MIN_TOKENS` tokens or more outside a capture). Then:
- padded (balanced routing, or few rows an expert): every expert padded to the busiest one's
  rows, one strided batched GEMM per projection;
- chunked (skewed routing): each expert's rows padded to a multiple of `CHUNK_ROWS`, every chunk
  one entry of one pointer-batched GEMM per projection (cublasGemmBatchedEx). All entries have
  one shape, so cuBLAS runs one kernel for all of them and the GPU fills whatever the skew;
  padding wastes less than a chunk an expert.
Both copy the token rows into the padded layout, apply SiLU-mul and combine each token's K
outputs with its routing weights in csrc/moe_chunks.cu, at about the copy rate (together 0.29
ms of a layer's 2.2 at 8192 tokens on the H200). benchmarks/bench_moe_prefill.py measures the
paths; cuBLAS' grouped GEMM (cublasGemmGroupedBatchedEx, 30% of peak) and one GEMM per expert
over side streams (host-bound: 2.7 ms a layer at any size) lost to these at every size and were
removed.
"""

from __future__ import annotations

from dataclasses import dataclass

import cupy as cp
import numpy as np

from pdserve.backends.cublas_capturable import CUDA_R_16BF, current
from pdserve.backends.cupy_kernels import BF16, Kernels, row_major

MIN_TOKENS = 256
# An expert's GEMMs over this many rows take about as long as reading its weights (H200: ~800
# TFLOP/s over ~4.3 TB/s, ~190 rows), so padding every expert to this many costs nothing.
FREE_ROWS = 192
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


@dataclass(frozen=True)
class Counted:
    """The pairs counted by expert (`count`); the counts reach the host while the GPU goes on."""

    counts: cp.ndarray  # [E] pairs of each expert
    rank: cp.ndarray  # [P] each pair's row among its expert's
    host: np.ndarray  # [E] pinned: the counts, once `ready` has happened
    ready: cp.cuda.Event


def count(k: Kernels, ids: cp.ndarray, e: int) -> Counted:
    """Counts the pairs of ids [T, K] int32 by expert and starts copying the counts to the host.
    Work queued after this runs while `moe_experts` waits for them."""
    pairs = ids.size
    counts = cp.zeros(e, np.int32)
    rank = k.empty((pairs,), np.int32)
    k.launch("moe_chunks.cu", "moe_count_pairs", (min(_cdiv(pairs, 256), 4 * k.num_sms),), 256,
             (ids, counts, rank, pairs))  # fmt: skip
    pinned = cp.cuda.alloc_pinned_memory(4 * e)  # from CuPy's pinned pool: no cudaHostAlloc
    host = np.frombuffer(pinned, np.int32, e)
    stream = cp.cuda.get_current_stream()
    cp.cuda.runtime.memcpyAsync(host.ctypes.data, counts.data.ptr, 4 * e,
                                cp.cuda.runtime.memcpyDeviceToHost, stream.ptr)  # fmt: skip
    return Counted(counts, rank, host, stream.record())


def moe_experts(
    k: Kernels, x: cp.ndarray, weights: cp.ndarray, ids: cp.ndarray, gate_up: cp.ndarray,
    down: cp.ndarray, path: str = "auto", chunk: int = CHUNK_ROWS,
    counted: Counted | None = None, addend: cp.ndarray | None = None,
) -> cp.ndarray:  # fmt: skip
    """sum_k weights[t, k] * down_e(silu_mul(gate_up_e(x[t]))), e = ids[t, k] (+ addend [T, H]
    bf16, the shared experts' output): [T, H] bf16. x [T, H] bf16, weights [T, K] float32, ids
    [T, K] int32, gate_up [E, 2I, H] and down [E, H, I] bf16, all contiguous; `counted`: `count`
    of these ids, if already started. `path` (one of PATHS) and `chunk` (rows) are for tests and
    benchmarks; "padded" falls back to "chunked" where an expert got no pair."""
    if path not in PATHS:
        raise ValueError(f"path {path!r} is not one of {PATHS}")
    pairs = ids.size
    e = gate_up.shape[0]
    counted = counted or count(k, ids, e)
    counted.ready.synchronize()  # the one sync a layer
    ms = counted.host.astype(np.int64)
    rank = counted.rank
    cap = int(ms.max())
    every = bool((ms > 0).all())
    if path == "auto":
        balanced = cap <= FREE_ROWS or cap * e <= (1 + MAX_PADDING) * pairs
        path = "padded" if every and balanced else "chunked"
    if path == "padded" and every:  # one chunk an expert
        return _run(k, x, weights, ids, rank, cap, np.arange(e), np.arange(e) * cap, gate_up,
                    down, True, addend)  # fmt: skip
    per = -(-ms // chunk)  # [E] chunks of each expert
    base = (np.cumsum(per) - per) * chunk  # [E] first padded row of each expert
    return _run(k, x, weights, ids, rank, chunk, np.repeat(np.arange(e), per), base, gate_up,
                down, False, addend)  # fmt: skip


def _run(
    k: Kernels, x: cp.ndarray, weights: cp.ndarray, ids: cp.ndarray, rank: cp.ndarray,
    chunk: int, expert: np.ndarray, base: np.ndarray, gate_up: cp.ndarray, down: cp.ndarray,
    strided: bool, addend: cp.ndarray | None,
) -> cp.ndarray:  # fmt: skip
    """The experts over NC = len(expert) chunks of `chunk` padded rows, chunk c all of expert[c]:
    expert e's pairs in rows base[e] + rank of the pair. `strided`: chunk c is expert c."""
    t, h = x.shape
    top_k = weights.shape[1]
    inter = gate_up.shape[1] // 2
    nc = len(expert)
    r = nc * chunk
    xs = k.empty((r, h), BF16)  # [R, H] token rows, chunk by chunk
    gu = k.empty((r, 2 * inter), BF16)  # [R, 2I]
    act = k.empty((r, inter), BF16)  # [R, I]
    y = k.empty((r, h), BF16)  # [R, H] expert outputs (bf16: the GEMMs output what they read)
    base32 = np.zeros(base.size + base.size % 2, np.int32)  # an even count, to pack in int64
    base32[: base.size] = base
    if strided:
        dev = cp.asarray(base32)
        at = dev.data.ptr
    else:  # per chunk: x, w, out addresses of the gate_up GEMM, then the down GEMM's
        c = np.arange(nc, dtype=np.int64) * chunk  # [NC] first padded row
        e = expert.astype(np.int64)
        ptrs = [xs.data.ptr + c * 2 * h, gate_up.data.ptr + e * gate_up.strides[0],
                gu.data.ptr + c * 4 * inter, act.data.ptr + c * 2 * inter,
                down.data.ptr + e * down.strides[0], y.data.ptr + c * 2 * h]  # fmt: skip
        dev = cp.asarray(np.concatenate([*ptrs, base32.view(np.int64)]))  # the one upload
        at = dev.data.ptr + 6 * 8 * nc
    pos = k.empty((t * top_k,), np.int32)  # padded row of each (token, k) pair
    k.launch("moe_chunks.cu", "moe_scatter_rows", (_cdiv(t * top_k, 8),), 256,
             (x, ids, rank, np.uint64(at), xs, pos, t * top_k, h, top_k))  # fmt: skip
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
    return combine(k, y, pos, weights, addend)


def _threads(vectors: int) -> int:
    """A block for a row of `vectors` 16-byte vectors (or elements): whole warps, at most 8."""
    return 32 * min(8, _cdiv(vectors, 32))


def silu_mul(k: Kernels, gu: cp.ndarray, act: cp.ndarray) -> None:
    """act [R, I] = silu(gu[:, :I]) * gu[:, I:], gu [R, 2I] bf16."""
    inter = act.shape[1]
    k.launch("moe_chunks.cu", "silu_mul_rows", (act.shape[0],),
             _threads(inter // 8 if inter % 8 == 0 else inter), (gu, act, inter))  # fmt: skip


def combine(
    k: Kernels, y: cp.ndarray, pos: cp.ndarray, weights: cp.ndarray,
    addend: cp.ndarray | None = None,
) -> cp.ndarray:  # fmt: skip
    """out [T, H] bf16 = sum_k weights[t, k] * y[pos[t * K + k]] (+ addend): y [R, H] bf16."""
    t, top_k = weights.shape
    h = y.shape[1]
    out = k.empty((t, h), BF16)
    add = np.uint64(0) if addend is None else row_major(addend)
    k.launch("moe_chunks.cu", "moe_chunk_combine", (t,), _threads(h // 8 if h % 8 == 0 else h),
             (y, pos, weights, add, out, h, top_k))  # fmt: skip
    return out
