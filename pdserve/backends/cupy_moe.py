"""Mixture of experts on the GPU: routing and the experts paths of csrc/moe.cu and gemv.cu.

Expert ids and routing weights stay on the device, and every launch size comes from shapes
(T, E, H, I), so the decode path is capturable in a CUDA graph. Up to `gemv_max_tokens` tokens
(decode), the pairs are grouped by expert on the device and each touched expert's gate_up and
down weights are streamed once, against all of its tokens (moe_group, then one grouped-GEMV
launch for gate_up with SiLU-mul fused, one for down with the weighted combine fused). Above
it, each GEMM is one grouped tensor-core launch over all experts. Dims that are not multiples
of 8 take GEMV kernels over (token, expert) pairs at any size.
"""

from __future__ import annotations

import cupy as cp
import numpy as np

from pdserve.backends.cupy_kernels import BF16, Kernels, row_major

TILE_ROWS = 64  # GM_BM in csrc/moe.cu
TILE_COLS = 64  # GM_BN
ROUTE_TOKENS = 8  # ROUTE_TOKENS in csrc/moe.cu
ROUTE_SPLIT = 256  # ROUTE_SPLIT
ROUTE_MAX_EXPERTS = 128  # 4 per lane of moe_topk's warp
DECODE_MAX_TOKENS = 256  # moe_gv_down keeps [warps, T, 16] float32 sums in shared memory


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def moe_route(
    k: Kernels, x: cp.ndarray, router: cp.ndarray, bias: cp.ndarray, top_k: int, norm_min: float
) -> tuple[cp.ndarray, cp.ndarray]:
    """x [T, H] -> (weights [T, K] float32, expert ids [T, K] int32); float32 throughout."""
    x = row_major(x)
    t, h = x.shape
    e = router.shape[0]
    if not 1 <= top_k <= min(e, 32):
        raise ValueError(f"moe_k {top_k} must be in [1, {min(e, 32)}]")
    if e > ROUTE_MAX_EXPERTS:
        raise ValueError(f"{e} experts: the cupy router takes at most {ROUTE_MAX_EXPERTS}")
    weights = k.empty((t, top_k), np.float32)
    ids = k.empty((t, top_k), np.int32)
    if t == 0:
        return weights, ids
    splits = _cdiv(h, ROUTE_SPLIT)
    partial = k.empty((splits, t, e), np.float32)  # [S, T, E] logits by slice of H
    k.launch("moe.cu", "moe_router_logits", (_cdiv(e, 8), splits, _cdiv(t, ROUTE_TOKENS)), 256,
             (x, row_major(router, np.float32), partial, t, h, e))  # fmt: skip
    k.launch("moe.cu", "moe_topk", (_cdiv(t, 8),), 256,
             (partial, splits, row_major(bias.reshape(-1), np.float32), weights, ids, t, e,
              top_k, float(norm_min)))  # fmt: skip
    return weights, ids


def group_pairs(k: Kernels, ids: cp.ndarray, e: int) -> tuple[cp.ndarray, ...]:
    """The T * K pairs of ids [T, K] int32 grouped by expert on the device: (order [P], and
    per slot s < min(E, P): expert [-1 past the touched ones], start, count); see moe_group."""
    pairs = ids.size
    slots = min(e, pairs)
    order = k.empty((pairs,), np.int32)
    group = (order, *(k.empty((slots,), np.int32) for _ in range(3)))
    k.launch("moe.cu", "moe_group", (1,), 256, (ids, pairs, e, slots, *group), shared=12 * e)
    return group


def _token_tiles(t: int) -> int:
    """Tiles of 8 tokens per expert chunk: T bounds any expert's count; at T = 32 an expert
    gets about 3 tokens, at 128 about 12, so 16 and 32 rarely need a second chunk."""
    return 1 if t <= 8 else 2 if t <= 64 else 4


def gate_up_act(
    k: Kernels,
    x: cp.ndarray,
    group: tuple,
    gate_up: cp.ndarray,
    top_k: int,
    warps: int | None = None,
) -> cp.ndarray:
    """silu(gate_e(x[t])) * up_e(x[t]) for every pair, rows in the group's order: [P, I]."""
    t, h = x.shape
    inter = gate_up.shape[1] // 2
    slots, nt = group[1].size, _token_tiles(t)
    if not warps:  # 4 (the most its 128 registers allow 4 blocks of), unless fewer fit the
        # grid in one wave: T = 1 has 6 x 96 blocks, 528 of 4 warps fit, 660 of 3
        blocks = slots * _cdiv(inter, 16)
        warps = next((w for w in (4, 3, 2) if 16 // w * k.num_sms >= blocks), 4)
    act = k.empty((group[0].size, inter), BF16)  # [P, I]
    per_warp = _cdiv(_cdiv(h, 32), warps)
    k.launch("gemv.cu", f"moe_gv_gate_up_nt{nt}", (slots, _cdiv(inter, 16)), 32 * warps,
             (x, *group, gate_up, act, h, inter, top_k, per_warp),
             shared=4 * warps * 2 * 16 * 8 * nt)  # fmt: skip
    return act


def down_combine(
    k: Kernels,
    act: cp.ndarray,
    group: tuple,
    weights: cp.ndarray,
    down: cp.ndarray,
    warps: int = 8,
    kparts: int | None = None,
) -> cp.ndarray:
    """sum over each token's pairs of weight * down_e(act[pair]): [T, H] bf16."""
    t, top_k = weights.shape
    h, inter = down.shape[1], down.shape[2]
    if kparts is None:  # few experts: split I too, so that enough warps stream
        kparts = 4 if t <= 2 else 2 if t <= 16 else 1
    out = k.empty((t, h), BF16)
    k.launch("gemv.cu", f"moe_gv_down_nt{_token_tiles(t)}", (_cdiv(h, 16),), 32 * warps,
             (act, *group, weights, down, out, t, h, inter, top_k, group[1].size, kparts),
             shared=4 * warps * t * 16)  # fmt: skip
    return out


def decode_experts(
    k: Kernels,
    x: cp.ndarray,
    weights: cp.ndarray,
    ids: cp.ndarray,
    gate_up: cp.ndarray,
    down: cp.ndarray,
    gate_up_warps: int | None = None,
    down_warps: int = 8,
    kparts: int | None = None,
) -> cp.ndarray:
    """The decode experts path: x [T, H] bf16, weights [T, K] f32, ids [T, K] int32 (all
    row-major), gate_up [E, 2I, H], down [E, H, I] bf16 with H and I multiples of 8 and T <=
    DECODE_MAX_TOKENS -> [T, H] bf16. The keyword arguments tune the launches (benchmarks).
    Grids: min(E, T * K) expert slots x I / 16 for gate_up (slots no expert fills exit at
    once), H / 16 for down."""
    if not 1 <= (gate_up_warps or 4) <= 4 or not 1 <= down_warps <= 8:
        raise ValueError("the kernels' launch bounds allow 1-4 gate_up and 1-8 down warps")
    group = group_pairs(k, ids, gate_up.shape[0])
    act = gate_up_act(k, x, group, gate_up, ids.shape[1], gate_up_warps)
    return down_combine(k, act, group, weights, down, down_warps, kparts)


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
    pairs = t * top_k
    if 0 < t <= min(gemv_max_tokens, DECODE_MAX_TOKENS) and h % 8 == 0 and inter % 8 == 0:
        return decode_experts(k, x, weights, ids, gate_up, down)
    out = k.empty((t, h), BF16)
    if t <= gemv_max_tokens or h % 8 or inter % 8:  # by pairs: any dims, any size
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
