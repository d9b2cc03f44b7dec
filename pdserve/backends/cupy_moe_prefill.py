"""The experts of a long prefill: tokens sorted by expert, then cuBLAS GEMMs per expert.

At thousands of tokens every expert gets hundreds of rows, so each expert's gate/up and down
projections are real GEMMs. They are issued as one grouped GEMM per projection
(cublasGemmGroupedBatchedEx, cuBLAS >= 12.5), or else one GEMM per expert over side streams.
The price is one device sync per layer, to read how many rows each expert got; decode never takes
this path (CUDA graphs cannot capture a sync), only passes of `MIN_TOKENS` tokens or more outside
a capture.
"""

from __future__ import annotations

import cupy as cp
import numpy as np

from pdserve.backends.cublas_capturable import CUDA_R_16BF, current, has_grouped_gemm
from pdserve.backends.cupy_kernels import BF16, Kernels
from pdserve.backends.cupy_moe import group_pairs

MIN_TOKENS = 256
USE_GROUPED = True  # cublasGemmGroupedBatchedEx where the library has it
# Every expert padded to the busiest one's rows, as one strided batched GEMM (cuBLAS' best
# kernels, one launch), while padding adds at most this multiple of the real rows. Measured at 8k
# tokens on the H200: balanced routing 3.6 ms a layer padded vs 5.2 grouped; but the benchmark's
# random router (busiest expert 2-5x the mean) made a whole 8k prefill 284 ms at 2.0 and 373 ms
# unbounded, vs 272 ms grouped. Trained routers are balanced by their correction bias.
MAX_PADDING = 0.5
# One expert's GEMM has too few output tiles to fill the GPU (768 rows x 3072 is 72 of cuBLAS'
# tiles at 8k tokens on 132 SMs), so consecutive experts run on different streams.
NUM_STREAMS = 4


class _Streams:
    """Side streams of the current device, forked from and joined back into the current one."""

    def __init__(self) -> None:
        self.streams = [cp.cuda.Stream(non_blocking=True) for _ in range(NUM_STREAMS)]

    def fork(self) -> None:
        ready = cp.cuda.get_current_stream().record()
        for s in self.streams:
            s.wait_event(ready)

    def join(self) -> None:
        main = cp.cuda.get_current_stream()
        for s in self.streams:
            main.wait_event(s.record())


_streams: dict[int, _Streams] = {}


def _side_streams(device: int) -> _Streams:
    if device not in _streams:
        with cp.cuda.Device(device):
            _streams[device] = _Streams()
    return _streams[device]


def applies(t: int) -> bool:
    """Whether a pass of t tokens takes this path."""
    return t >= MIN_TOKENS and not cp.cuda.get_current_stream().is_capturing()


def moe_experts(
    k: Kernels, x: cp.ndarray, weights: cp.ndarray, ids: cp.ndarray, gate_up: cp.ndarray,
    down: cp.ndarray,
) -> cp.ndarray:  # fmt: skip
    """sum_k weights[t, k] * down_e(silu_mul(gate_up_e(x[t]))), e = ids[t, k]: [T, H] bf16.
    x [T, H] bf16 contiguous; gate_up [E, 2I, H], down [E, H, I] bf16 contiguous."""
    t, h = x.shape
    top_k = ids.shape[1]
    e, inter = gate_up.shape[0], gate_up.shape[1] // 2
    pairs = t * top_k
    order, slot_expert, slot_start, slot_count = group_pairs(k, ids, e)  # pairs by expert
    n = slot_expert.size
    meta = cp.asnumpy(cp.concatenate([slot_expert, slot_start, slot_count]))  # the one sync
    touched = meta[:n] >= 0
    experts, starts, ms = meta[:n][touched], meta[n : 2 * n][touched], meta[2 * n :][touched]
    if len(experts) == e and ms.max() * e <= (1 + MAX_PADDING) * pairs:
        return _padded(k, x, weights, order, starts, int(ms.max()), top_k, gate_up, down)
    xs = x.view(np.uint16)[order // top_k].view(BF16)  # [P, H] token rows in expert order
    gu = k.empty((pairs, 2 * inter), BF16)  # [P, 2I]
    act = k.empty((pairs, inter), BF16)  # [P, I]
    # [P, H] expert outputs, rows in expert order (bf16: grouped GEMMs output what they read)
    y = k.empty((pairs, h), BF16)
    if USE_GROUPED and has_grouped_gemm():
        _grouped(k, ms, starts, experts, xs, gate_up, gu, down, act, y)
    else:
        _per_stream(k, ms, starts, experts, xs, gate_up, gu, down, act, y)
    pos = cp.empty(pairs, np.int32)
    pos[order] = cp.arange(pairs, dtype=np.int32)  # sorted row of each pair
    return _combine(k, y, pos, weights, t, top_k)


def _combine(
    k: Kernels, y: cp.ndarray, pos: cp.ndarray, weights: cp.ndarray, t: int, top_k: int
) -> cp.ndarray:
    h = y.shape[1]
    out = k.empty((t, h), BF16)
    k.launch("moe_prefill.cu", "moe_combine_sorted", (t,), 256,
             (y, pos, weights, out, h, top_k))  # fmt: skip
    return out


def _silu_mul(k: Kernels, gu: cp.ndarray, act: cp.ndarray) -> None:
    n, inter = act.size, act.shape[1]
    k.launch("elementwise.cu", "silu_mul", (max(1, min(-(-n // 256), 8 * k.num_sms)),), 256,
             (gu, act, inter, np.int64(n)))  # fmt: skip


def _addresses(base: cp.ndarray, index: np.ndarray, stride_bytes: int) -> cp.ndarray:
    """Device array of base + index * stride_bytes, as uint64 addresses."""
    return cp.asarray(np.uint64(base.data.ptr) + index.astype(np.uint64) * np.uint64(stride_bytes))


def _grouped(
    k: Kernels, ms: np.ndarray, starts: np.ndarray, experts: np.ndarray, xs: cp.ndarray,
    gate_up: cp.ndarray, gu: cp.ndarray, down: cp.ndarray, act: cp.ndarray, y: cp.ndarray,
) -> None:  # fmt: skip
    """Both projections as one grouped GEMM call each: cuBLAS schedules every expert's tiles
    together, so the GPU fills however few rows an expert has."""
    h, inter = xs.shape[1], act.shape[1]
    blas = current()
    blas.gemm_grouped_nt(ms, 2 * inter, h, _addresses(xs, starts, 2 * h), h,
                         _addresses(gate_up, experts, gate_up[0].nbytes), h,
                         _addresses(gu, starts, 4 * inter), 2 * inter, CUDA_R_16BF)  # fmt: skip
    _silu_mul(k, gu, act)
    blas.gemm_grouped_nt(ms, h, inter, _addresses(act, starts, 2 * inter), inter,
                         _addresses(down, experts, down[0].nbytes), inter,
                         _addresses(y, starts, 2 * h), h, CUDA_R_16BF)  # fmt: skip


def _per_stream(
    k: Kernels, ms: np.ndarray, starts: np.ndarray, experts: np.ndarray, xs: cp.ndarray,
    gate_up: cp.ndarray, gu: cp.ndarray, down: cp.ndarray, act: cp.ndarray, y: cp.ndarray,
) -> None:  # fmt: skip
    """Without grouped GEMMs (cuBLAS < 12.5): one GEMM per expert, spread over side streams."""
    h, inter = xs.shape[1], act.shape[1]
    side = _side_streams(cp.cuda.runtime.getDevice())
    side.fork()
    for j, (expert, n, row) in enumerate(zip(experts, ms, starts)):
        with side.streams[j % NUM_STREAMS]:
            current().gemm_nt(int(n), 2 * inter, h, xs.data.ptr + int(row) * h * 2, h,
                              gate_up[expert].data.ptr, h, gu.data.ptr + int(row) * 4 * inter,
                              2 * inter, CUDA_R_16BF)  # fmt: skip
    side.join()
    _silu_mul(k, gu, act)
    side.fork()
    for j, (expert, n, row) in enumerate(zip(experts, ms, starts)):
        with side.streams[j % NUM_STREAMS]:
            current().gemm_nt(int(n), h, inter, act.data.ptr + int(row) * inter * 2, inter,
                              down[expert].data.ptr, inter, y.data.ptr + int(row) * h * 2, h,
                              CUDA_R_16BF)  # fmt: skip
    side.join()


def _padded(
    k: Kernels, x: cp.ndarray, weights: cp.ndarray, order: cp.ndarray, starts: np.ndarray,
    cap: int, top_k: int, gate_up: cp.ndarray, down: cp.ndarray,
) -> cp.ndarray:  # fmt: skip
    """Every expert's rows padded to `cap`, the busiest expert's count: [E, cap, ...] operands and
    one strided batched GEMM per projection. Padding rows compute on token 0 and nobody reads
    them. `order` lists the pairs by expert, expert e's from starts[e]."""
    t, h = x.shape
    e, inter = gate_up.shape[0], gate_up.shape[1] // 2
    pairs = t * top_k
    first = cp.asarray(starts.astype(np.int32))  # [E]
    i = cp.arange(pairs, dtype=np.int32)
    expert = cp.searchsorted(first, i, side="right").astype(np.int32) - 1  # [P] of sorted row i
    dest = expert * cap + i - first[expert]  # [P] padded row of sorted row i
    src = cp.zeros(e * cap, np.int32)  # token of each padded row
    src[dest] = order // top_k
    xs = x.view(np.uint16)[src].view(BF16)  # [E * cap, H]
    gu = k.empty((e * cap, 2 * inter), BF16)
    blas = current()
    blas.gemm_batched_nt(e, cap, 2 * inter, h, xs.data.ptr, h, cap * h, gate_up.data.ptr, h,
                         2 * inter * h, gu.data.ptr, 2 * inter, cap * 2 * inter,
                         CUDA_R_16BF)  # fmt: skip
    act = k.empty((e * cap, inter), BF16)
    _silu_mul(k, gu, act)
    y = k.empty((e * cap, h), BF16)
    blas.gemm_batched_nt(e, cap, h, inter, act.data.ptr, inter, cap * inter, down.data.ptr,
                         inter, h * inter, y.data.ptr, h, cap * h, CUDA_R_16BF)  # fmt: skip
    pos = cp.empty(pairs, np.int32)
    pos[order] = dest  # padded row of each (token, k) pair
    return _combine(k, y, pos, weights, t, top_k)
