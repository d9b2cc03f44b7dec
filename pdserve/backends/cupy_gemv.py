"""Dense linears at decode sizes: csrc/gemv.cu streams every weight byte once for up to 32
tokens on the tensor cores; `linear` uses it up to GEMV_MAX_TOKENS, and cuBLAS for larger
batches, the lm_head, and layouts the kernel cannot load 16 bytes at a time (K not a multiple
of 8, unaligned weights).

The launch depends only on shapes (T, N, K) and the device's SM count, so it is capturable in
a CUDA graph: no host sync, one output from `Kernels.empty`.
"""

from __future__ import annotations

import cupy as cp
import numpy as np

from pdserve.backends.cupy_kernels import BF16, Kernels, gemm, row_major

MAX_TOKENS = 32  # the kernels' limit: up to 4 tiles of 8 tokens
# Batches up to this size take the GEMV; check it against the cuBLAS rows of
# benchmarks/bench_decode_kernels.py whenever either side changes. Measured on the H200
# (2026-11-25, the double-buffered GEMV): it beats cuBLAS up to 8 rows on the layer shapes (by up
# to 20%) and loses at 32; on the lm_head (103424 x 2560) cuBLAS wins at every size.
GEMV_MAX_TOKENS = 8
GEMV_MAX_ROWS = 32768  # weights with more rows (the lm_head) stay with cuBLAS
ROWS = 16  # weight rows per block (one mma tile)
WARP_SLOTS = 16  # warps an SM holds at the kernels' register cap (128 per thread)


def plan(k: Kernels, n: int, kdim: int, warps: int | None = None) -> tuple[int, int]:
    """(warps per block, k-steps of 32 per warp) for W [n, kdim]. A block owns 16 rows and
    its warps split K: as many warps as still let every block be resident at once (N = 2560
    gives 160 blocks for 132 SMs: 8 warps, 2 blocks per SM); a second, partial wave of blocks
    would double the time. Grids larger than one wave get one warp per block."""
    steps = -(-kdim // 32)
    if warps is None:
        tiles = -(-n // ROWS)
        warps = next((w for w in range(16, 0, -1) if WARP_SLOTS // w * k.num_sms >= tiles), 1)
        warps = min(warps, max(1, steps // 4))  # at least 4 k-steps each
    per_warp = -(-steps // max(1, min(warps, 16)))
    return -(-steps // per_warp), per_warp


def weight_ok(w: cp.ndarray) -> bool:
    """Whether the GEMV can stream `w` [N, K]: bf16, row-major, rows 16-byte aligned."""
    return (
        w.ndim == 2
        and w.dtype == BF16
        and w.flags.c_contiguous
        and w.data.ptr % 16 == 0
        and w.shape[1] % 8 == 0
    )


def rows_ok(x: cp.ndarray) -> bool:
    """Whether the GEMV can read x [T, K] as it is: bf16, unit column stride, rows 16-byte
    aligned (a column slice of a wider activation qualifies when its offsets do)."""
    return (
        x.dtype == BF16
        and x.strides[1] == 2
        and x.data.ptr % 16 == 0
        and (x.shape[0] == 1 or (x.strides[0] > 0 and x.strides[0] % 16 == 0))
    )


def gemv(
    k: Kernels, x: cp.ndarray, w: cp.ndarray, out_dtype: np.dtype, warps: int | None = None
) -> cp.ndarray:
    """x [T, K] . w [N, K]^T -> [T, N] in `out_dtype` (bf16 or float32), 1 <= T <= 32; x and w
    must pass `rows_ok` and `weight_ok`. `warps` overrides the plan (benchmarks tune with it)."""
    t, kdim = x.shape
    n = w.shape[0]
    if not 1 <= t <= MAX_TOKENS:
        raise ValueError(f"gemv takes 1 to {MAX_TOKENS} rows, not {t}")
    nt = -(-t // 8)
    warps, per_warp = plan(k, n, kdim, warps)
    out_f32 = np.dtype(out_dtype) == np.float32
    out = k.empty((t, n), np.float32 if out_f32 else BF16)  # [T, N]
    ldx = x.strides[0] // 2 if t > 1 else kdim
    k.launch("gemv.cu", f"gemv_nt{nt}", (-(-n // ROWS),), 32 * warps,
             (x, np.int64(ldx), w, out, out_f32, t, n, kdim, per_warp),
             shared=4 * warps * ROWS * 8 * nt)  # fmt: skip
    return out


def linear(k: Kernels, x: cp.ndarray, w: cp.ndarray, out_dtype: np.dtype) -> cp.ndarray:
    """x [T, K] . w [N, K]^T -> [T, N]: the GEMV for up to GEMV_MAX_TOKENS rows where the
    layout allows it, else cuBLAS."""
    t = x.shape[0]
    if not (1 <= t <= GEMV_MAX_TOKENS and w.shape[0] <= GEMV_MAX_ROWS and weight_ok(w)
            and x.shape[1] == w.shape[1]):  # fmt: skip
        return gemm(k, x, w, out_dtype)
    if not rows_ok(x):
        x = row_major(x)  # a copy of a few rows: cheap next to streaming the weight
    return gemv(k, x, w, out_dtype)


def fuses_rope(x: cp.ndarray, w: cp.ndarray, head_dim: int) -> bool:
    """Whether `linear_rope_kv` takes this qkv projection: a GEMV batch, heads that fill whole
    16-row blocks."""
    t = x.shape[0]
    return (
        1 <= t <= GEMV_MAX_TOKENS
        and head_dim % ROWS == 0
        and w.shape[0] <= GEMV_MAX_ROWS
        and weight_ok(w)
        and x.shape[1] == w.shape[1]
    )


def linear_rope_kv(
    k: Kernels, x: cp.ndarray, w: cp.ndarray, heads: int, kv_heads: int, positions: cp.ndarray,
    inv_freq: cp.ndarray, kv_layer: cp.ndarray, slot_mapping: cp.ndarray,
) -> cp.ndarray:  # fmt: skip
    """The qkv projection x [T, K] . w [(heads + 2 kv_heads) D, K]^T with RoPE and the KV write
    as its epilogue (csrc/gemv.cu, gemv_rope_kv): q [T, heads, D] bf16; k and v go to kv_layer
    at slot_mapping [T] int64. positions [T] int64, inv_freq [D / 2] float32; `fuses_rope`
    must hold."""
    t, kdim = x.shape
    n, d = w.shape[0], 2 * inv_freq.shape[0]
    if n != (heads + 2 * kv_heads) * d:
        raise ValueError(f"qkv weight of {n} rows for {heads} + 2 x {kv_heads} heads of {d}")
    if not rows_ok(x):
        x = row_major(x)
    warps, per_warp = plan(k, n, kdim)
    q = k.empty((t, heads, d), BF16)  # [T, heads, D]
    ldx = x.strides[0] // 2 if t > 1 else kdim
    k.launch("gemv.cu", "gemv_rope_kv_nt1", (n // ROWS,), 32 * warps,
             (x, np.int64(ldx), w, t, kdim, per_warp, positions, inv_freq, q, slot_mapping,
              kv_layer, np.int64(kv_layer[0].size), heads, kv_heads, d),
             shared=4 * warps * ROWS * 8)  # fmt: skip
    return q
