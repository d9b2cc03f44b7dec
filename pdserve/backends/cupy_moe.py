"""Mixture of experts on the GPU: routing and the experts path of csrc/moe.cu.

Expert ids and routing weights stay on the device. Up to `gemv_max_tokens` tokens (decode), a
GEMV-like kernel walks the (token, expert) pairs; above it, the pairs are grouped by expert on
the device and each GEMM is one grouped launch over all experts. Either way a layer's experts
cost two or three launches, whatever the number of experts.
"""

from __future__ import annotations

import cupy as cp
import numpy as np

from pdserve.backends.cupy_kernels import BF16, Kernels, row_major

TILE_ROWS = 64  # GM_BM in csrc/moe.cu
TILE_COLS = 64  # GM_BN


def moe_route(
    k: Kernels, x: cp.ndarray, router: cp.ndarray, bias: cp.ndarray, top_k: int, norm_min: float
) -> tuple[cp.ndarray, cp.ndarray]:
    """x [T, H] -> (weights [T, K] float32, expert ids [T, K] int32); float32 throughout."""
    x = row_major(x)
    t, h = x.shape
    e = router.shape[0]
    if not 1 <= top_k <= e:
        raise ValueError(f"moe_k {top_k} must be in [1, {e}]")
    weights = k.empty((t, top_k), np.float32)
    ids = k.empty((t, top_k), np.int32)
    args = (x, row_major(router, np.float32), row_major(bias.reshape(-1), np.float32), weights,
            ids, h, e, top_k, float(norm_min))  # fmt: skip
    k.launch("moe.cu", "moe_route", (t,), 256, args, shared=4 * (h + 2 * e))
    return weights, ids


def moe_experts(
    k: Kernels,
    x: cp.ndarray,
    weights: cp.ndarray,
    ids: cp.ndarray,
    gate_up: cp.ndarray,
    down: cp.ndarray,
    gemv_max_tokens: int = 8,
) -> cp.ndarray:
    """sum_k weights[t, k] * down_e(silu_mul(gate_up_e(x[t]))), e = ids[t, k]: [T, H] bf16.
    gate_up: [E, 2I, H] bf16; down: [E, H, I] bf16."""
    x = row_major(x)
    t, h = x.shape
    top_k = ids.shape[1]
    e, inter = gate_up.shape[0], gate_up.shape[1] // 2
    ids = row_major(ids, np.int32)
    weights = row_major(weights, np.float32)
    out = k.empty((t, h), BF16)
    pairs = t * top_k
    if t <= gemv_max_tokens or h % 8 or inter % 8:
        act = k.empty((pairs, inter), BF16)
        k.launch("moe.cu", "moe_gemv_gate_up", (pairs, -(-inter // 4)), 128,
                 (x, ids, gate_up, act, h, inter, top_k))  # fmt: skip
        k.launch("moe.cu", "moe_gemv_down", (t, -(-h // 4)), 128,
                 (act, ids, weights, down, out, h, inter, top_k))  # fmt: skip
        return out
    # every expert adds at most one partial tile
    max_tiles = pairs // TILE_ROWS + e + 1
    order = k.empty((pairs,), np.int32)
    tile_expert, tile_start, tile_end = (k.empty((max_tiles,), np.int32) for _ in range(3))
    tiles = (tile_expert, tile_start, tile_end)
    k.launch("moe.cu", "moe_align", (1,), 1024,
             (ids, pairs, e, TILE_ROWS, max_tiles, order, *tiles), shared=12 * e)  # fmt: skip
    act = k.empty((pairs, inter), BF16)  # rows in expert order
    k.launch("moe.cu", "moe_gemm_gate_up", (max_tiles, -(-inter // TILE_COLS)), 128,
             (x, order, *tiles, gate_up, act, h, inter, top_k))  # fmt: skip
    y = k.empty((pairs, h), np.float32)  # rows by pair
    k.launch("moe.cu", "moe_gemm_down", (max_tiles, -(-h // TILE_COLS)), 128,
             (act, order, *tiles, down, y, h, inter))  # fmt: skip
    k.launch("moe.cu", "moe_combine", (t,), 256, (y, weights, out, h, top_k))
    return out
