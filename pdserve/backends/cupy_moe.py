"""Mixture of experts on the GPU: routing (csrc/moe.cu) and the experts of batches below the
prefill path's size (csrc/moe_decode.cu; long prefills take cupy_moe_prefill.py).

Expert ids and routing weights stay on the device, and every launch size comes from shapes
(T, E, H, I), so this path is capturable in a CUDA graph. The pairs are grouped by expert on the
device and each touched expert's gate_up and down weights are streamed once, against all of their
tokens (moe_group, then one launch for every gate_up with SiLU-mul fused, one for every down, and
the weighted combine). The shared experts run on the same kernels in launches of their own, on a
side stream, and the combine adds their output. Dims that are not multiples of 8 take GEMV
kernels over (token, expert) pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

import cupy as cp
import numpy as np

from pdserve.backends import cupy_prefetch
from pdserve.backends.cupy_kernels import (
    BF16,
    Kernels,
    Pending,
    norm_threads,
    row_major,
    row_major_float,
)

ROUTE_TOKENS = 8  # ROUTE_TOKENS in csrc/moe.cu
ROUTE_SPLIT = 256  # ROUTE_SPLIT
ROUTE_MAX_EXPERTS = 128  # 4 per lane of moe_topk's warp


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def check_route(e: int, top_k: int) -> None:
    """The routers' limits: top_k in [1, min(E, 32)], E <= ROUTE_MAX_EXPERTS."""
    if not 1 <= top_k <= min(e, 32):
        raise ValueError(f"moe_k {top_k} must be in [1, {min(e, 32)}]")
    if e > ROUTE_MAX_EXPERTS:
        raise ValueError(f"{e} experts: the cupy router takes at most {ROUTE_MAX_EXPERTS}")


def topk(
    k: Kernels, logits: cp.ndarray, bias: cp.ndarray, top_k: int, norm_min: float
) -> tuple[cp.ndarray, cp.ndarray]:
    """moe_topk over router logits [S, T, E] float32 given as S slices that add up: (weights
    [T, K] float32, expert ids [T, K] int32)."""
    splits, t, e = logits.shape
    weights = k.empty((t, top_k), np.float32)
    ids = k.empty((t, top_k), np.int32)
    if t > 0:
        k.launch("moe.cu", "moe_topk", (_cdiv(t, 8),), 256,
                 (logits, splits, row_major(bias.reshape(-1), np.float32), weights, ids, t, e,
                  top_k, float(norm_min)))  # fmt: skip
    return weights, ids


def moe_route(
    k: Kernels, x: cp.ndarray, router: cp.ndarray, bias: cp.ndarray, top_k: int, norm_min: float
) -> tuple[cp.ndarray, cp.ndarray]:
    """x [T, H] -> (weights [T, K] float32, expert ids [T, K] int32); float32 throughout."""
    x = row_major(x)
    t, h = x.shape
    e = router.shape[0]
    check_route(e, top_k)
    splits = _cdiv(h, ROUTE_SPLIT)
    partial = k.empty((splits, t, e), np.float32)  # [S, T, E] logits by slice of H
    if t > 0:
        k.launch("moe.cu", "moe_router_logits", (_cdiv(e, 8), splits, _cdiv(t, ROUTE_TOKENS)),
                 256, (x, row_major(router, np.float32), partial, t, h, e))  # fmt: skip
    return topk(k, partial, bias, top_k, norm_min)


def group_pairs(k: Kernels, ids: cp.ndarray, e: int) -> tuple[tuple[cp.ndarray, ...], cp.ndarray]:
    """The T * K pairs of ids [T, K] int32 grouped by expert on the device: ((order [P], and
    per slot s < min(E, P): expert [-1 past the touched ones], start, count), pos [P], each
    pair's position in order); see moe_group."""
    pairs = ids.size
    slots = min(e, pairs)
    order, pos = k.empty((pairs,), np.int32), k.empty((pairs,), np.int32)
    group = (order, *(k.empty((slots,), np.int32) for _ in range(3)))
    k.launch("moe.cu", "moe_group", (1,), 256, (ids, pairs, e, slots, *group, pos),
             shared=12 * e)  # fmt: skip
    return group, pos


def _token_tiles(t: int) -> int:
    """Tiles of 8 tokens per expert chunk: T bounds any expert's count; at T = 32 an expert
    gets about 3 tokens, at 128 about 12. At T = 32 one tile (the shared slots re-read their
    rows from L2 every 8 tokens) measured as fast as two (whose kernel spills registers); the
    shared experts, which see every token, choose their own (`shared_experts`)."""
    return 1 if t <= 32 else 2 if t <= 64 else 4


def _one_wave_warps(k: Kernels, blocks: int, choices: tuple[int, ...]) -> int:
    """The most warps a block (of `choices`) while all `blocks` are resident at once (16 warps
    an SM at the kernels' 128 registers a thread), else the first choice: a second, partial
    wave would cost as much as the first."""
    return next((w for w in choices if 16 // w * k.num_sms >= blocks), choices[0])


def gate_up_act(
    k: Kernels, x: cp.ndarray, group: tuple, inter: int, gate_up: cp.ndarray | None,
    shared_gate_up: cp.ndarray | None, top_k: int, warps: int | None = None,
    token_tiles: int | None = None,
) -> tuple[cp.ndarray, cp.ndarray]:  # fmt: skip
    """silu(gate(x)) * up(x) for every pair of the routed experts (gate_up [E, 2 inter, H];
    None when the group has no slots), rows in the group's order, [P, inter]; and for the
    shared experts (gate_up [2Is, H]) if given, [T, Is] (else [T, 0])."""
    t, h = x.shape
    inter_s = 0 if shared_gate_up is None else shared_gate_up.shape[0] // 2
    slots = group[1].size + _cdiv(inter_s, inter)
    act = k.empty((group[0].size, inter), BF16)  # [P, I]
    act_s = k.empty((t, inter_s), BF16)  # [T, Is]
    warps = warps or _one_wave_warps(k, slots * _cdiv(inter, 16), (4, 3, 2))
    nt = token_tiles or _token_tiles(t)
    either = shared_gate_up if gate_up is None else gate_up  # what the other pointer takes
    k.launch("moe_decode.cu", f"moe_gate_up_nt{nt}", (slots, _cdiv(inter, 16)), 32 * warps,
             (x, *group, either, either if shared_gate_up is None else shared_gate_up, act,
              act_s, t, h, inter, inter_s, top_k, group[1].size, _cdiv(_cdiv(h, 32), warps)),
             shared=4 * warps * 2 * 16 * 8 * nt)  # fmt: skip
    return act, act_s


def down_proj(
    k: Kernels, act: cp.ndarray, act_s: cp.ndarray, group: tuple, h: int,
    down: cp.ndarray | None, shared_down: cp.ndarray | None, warps: int = 4,
    token_tiles: int | None = None,
) -> tuple[cp.ndarray, cp.ndarray]:  # fmt: skip
    """Each pair's expert output [P, h] (rows in the group's order; down [E, h, I], None when
    the group has no slots) and each shared slot's [n_shared, T, h] (n_shared = 0 without
    shared experts), float32."""
    t, inter, inter_s = act_s.shape[0], act.shape[1], act_s.shape[1]
    n_shared = _cdiv(inter_s, inter)
    y = k.empty((act.shape[0], h), np.float32)  # [P, H]
    y_s = k.empty((n_shared, t, h), np.float32)  # [n_shared, T, H]
    nt = token_tiles or _token_tiles(t)
    either = shared_down if down is None else down
    k.launch("moe_decode.cu", f"moe_down_nt{nt}", (group[1].size + n_shared, _cdiv(h, 16)),
             32 * warps, (act, act_s, *group[1:], either, either if shared_down is None else
                          shared_down, y, y_s, t, h, inter, inter_s, group[1].size,
                          _cdiv(_cdiv(inter, 32), warps)),
             shared=4 * warps * 16 * 8 * nt)  # fmt: skip
    return y, y_s


def combine(
    k: Kernels, y: cp.ndarray, y_s: cp.ndarray, pos: cp.ndarray, weights: cp.ndarray,
    norm: tuple[cp.ndarray, cp.ndarray, float] | None = None,
) -> cp.ndarray | tuple[cp.ndarray, cp.ndarray]:  # fmt: skip
    """[T, H] bf16: each token's pairs' outputs by their weights, plus its shared outputs. With
    `norm` = (residual [T, H] bf16 or float32, weight [H] bf16, eps), `add_rms_norm` of that in
    the same launch: (normalized [T, H] bf16, residual + output [T, H] float32)."""
    t, top_k = weights.shape
    n_shared = y_s.shape[0]
    h = y.shape[1]
    if top_k > 32:
        raise ValueError(f"moe_k {top_k}: the decode experts path takes at most 32")
    out = k.empty((t, h), BF16)
    if norm is None:
        k.launch("moe_decode.cu", "moe_combine_decode", (t, _cdiv(h, 256)), 256,
                 (y, y_s, pos, weights, out, t, h, top_k, n_shared))  # fmt: skip
        return out
    residual, weight, eps = norm
    residual = row_major_float(residual)
    res_out = k.empty((t, h), np.float32)
    k.launch("moe_decode.cu", "moe_combine_add_rms_norm", (t,), norm_threads(h),
             (y, y_s, pos, weights, residual, residual.dtype == np.float32, weight, out,
              res_out, t, h, top_k, n_shared, float(eps)))  # fmt: skip
    return out, res_out


def _no_pairs(k: Kernels) -> tuple[cp.ndarray, ...]:
    """A grouping with no routed slots: launches of the experts' kernels for the shared slots
    alone."""
    return tuple(k.empty((0,), np.int32) for _ in range(4))


def shared_experts(
    k: Kernels, x: cp.ndarray, inter: int, gate_up: cp.ndarray, down: cp.ndarray,
    warps: int | None = None, token_tiles: int | None = None,
) -> cp.ndarray:  # fmt: skip
    """The shared experts (one MLP: gate_up [2Is, H], down [H, Is]) on the experts' kernels, as
    ceil(Is / inter) slots of `inter` units: their outputs [n_shared, T, H] float32, which
    `combine` adds. They need no routing, so CupyOps starts them on a side stream first."""
    none = _no_pairs(k)
    t = x.shape[0]
    # every token passes through the shared experts: as many tiles as the kernels take (each
    # further chunk re-reads the weights; at T = 32, four 8-token chunks ran at 18% of the copy
    # rate)
    token_tiles = token_tiles or (1 if t <= 8 else 2 if t <= 16 else 4)
    act, act_s = gate_up_act(k, x, none, inter, None, gate_up, 1, warps, token_tiles)
    _, y_s = down_proj(k, act, act_s, none, x.shape[1], None, down, token_tiles=token_tiles)
    return y_s


def shared_on_side(
    k: Kernels, x: cp.ndarray, inter: int, shared: tuple[cp.ndarray, cp.ndarray]
) -> Pending:
    """`shared_experts` started on the side stream (Kernels.on_side): it overlaps whatever the
    current stream does next, routing included when started before it."""
    return k.on_side(shared_experts, k, x, inter, *(row_major(w) for w in shared))


def decode_experts(
    k: Kernels,
    x: cp.ndarray,
    weights: cp.ndarray,
    ids: cp.ndarray,
    gate_up: cp.ndarray,
    down: cp.ndarray,
    shared: tuple[cp.ndarray, cp.ndarray] | Pending | None = None,
    gate_up_warps: int | None = None,
    down_warps: int = 4,
    token_tiles: int | None = None,
    norm: tuple[cp.ndarray, cp.ndarray, float] | None = None,
    prefetch: Sequence[cp.ndarray] | None = None,
) -> cp.ndarray | tuple[cp.ndarray, cp.ndarray]:
    """The decode experts path (csrc/moe_decode.cu): x [T, H] bf16, weights [T, K] f32, ids
    [T, K] int32 (all row-major), gate_up [E, 2I, H], down [E, H, I] bf16 with H and I
    multiples of 8 -> [T, H] bf16, plus the shared experts' output, unweighted: `shared` is
    their weights (gate_up [2Is, H], down [H, Is], Is a multiple of 8; run here, alongside the
    routed experts, on the side stream) or their `shared_experts` output on its way. Grids:
    one slot per expert a pair may touch (min(E, T * K); slots no expert fills exit at once),
    times I / 16 rows for gate_up and H / 16 for down. The keyword arguments tune the routed
    launches (benchmarks: token_tiles is 1, 2 or 4 tiles of 8 tokens a chunk). `norm`: see
    `combine`. With `prefetch` (a list, maybe empty), L2 prefetches start (cupy_prefetch.start:
    detached or inline): the touched experts' down matrices beside gate_up when few enough, and
    the arrays of `prefetch` once gate_up is done."""
    for w in (gate_up_warps, down_warps):
        if w is not None and not 1 <= w <= 4:
            raise ValueError("the kernels' launch bounds allow 1-4 warps a block")
    inter = gate_up.shape[1] // 2
    if isinstance(shared, tuple):
        shared = shared_on_side(k, x, inter, shared)
    group, pos = group_pairs(k, ids, gate_up.shape[0])
    if prefetch is not None and cupy_prefetch.experts_fit(group[1].size, down):
        cupy_prefetch.start(k, cupy_prefetch.expert_matrices, k, group[1], down)
    act, act_s = gate_up_act(k, x, group, inter, gate_up, None, ids.shape[1], gate_up_warps,
                             token_tiles)  # fmt: skip
    if prefetch:
        cupy_prefetch.start(k, cupy_prefetch.l2, k, prefetch)
    y, _ = down_proj(k, act, act_s, group, x.shape[1], down, None, down_warps, token_tiles)
    y_s = k.empty((0, x.shape[0], x.shape[1]), np.float32) if shared is None else shared.get()
    return combine(k, y, y_s, pos, weights, norm)


def streams(h: int, inter: int) -> bool:
    """Whether `decode_experts` takes experts of these dims (its 16-byte loads need multiples
    of 8 elements)."""
    return h % 8 == 0 and inter % 8 == 0


def moe_experts(
    k: Kernels,
    x: cp.ndarray,
    weights: cp.ndarray,
    ids: cp.ndarray,
    gate_up: cp.ndarray,
    down: cp.ndarray,
) -> cp.ndarray:
    """sum_k weights[t, k] * down_e(silu_mul(gate_up_e(x[t]))), e = ids[t, k]: [T, H] bf16.
    gate_up: [E, 2I, H] bf16; down: [E, H, I] bf16."""
    x = row_major(x)
    t, h = x.shape
    top_k = ids.shape[1]
    inter = gate_up.shape[1] // 2
    ids = row_major(ids, np.int32)
    weights = row_major(weights, np.float32)
    if t > 0 and streams(h, inter):
        return decode_experts(k, x, weights, ids, gate_up, down)
    out = k.empty((t, h), BF16)  # by pairs: any dims
    pairs = t * top_k
    if pairs == 0:
        return out
    act = k.empty((pairs, inter), BF16)
    k.launch("moe.cu", "moe_gemv_gate_up", (pairs, -(-inter // 4)), 128,
             (x, ids, gate_up, act, h, inter, top_k))  # fmt: skip
    k.launch("moe.cu", "moe_gemv_down", (t, -(-h // 4)), 128,
             (act, ids, weights, down, out, h, inter, top_k))  # fmt: skip
    return out
