"""The experts of a long prefill: tokens sorted by expert, then one cuBLAS GEMM per expert.

At thousands of tokens every expert gets hundreds of rows, so each expert's gate/up and down
projections are real GEMMs that cuBLAS runs near the tensor-core peak. The price is one device
sync per layer, to read how many rows each expert got; decode never takes this path (CUDA graphs
cannot capture a sync), only forward passes of at least `MIN_TOKENS` tokens outside a capture.
"""

from __future__ import annotations

import cupy as cp
import numpy as np

from pdserve.backends.cublas_capturable import CUDA_R_16BF, CUDA_R_32F, for_device
from pdserve.backends.cupy_kernels import BF16, Kernels

MIN_TOKENS = 256


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
    flat = ids.reshape(-1)  # [P] expert of each (token, k) pair
    order = cp.argsort(flat)  # [P] pairs sorted by expert
    counts = cp.asnumpy(cp.bincount(flat, minlength=e))  # the one sync of the layer
    xs = x.view(np.uint16)[order // top_k].view(BF16)  # [P, H] token rows in expert order
    gu = k.empty((pairs, 2 * inter), BF16)  # [P, 2I]
    blas = for_device(x.device.id)
    row = 0
    for expert in np.flatnonzero(counts):
        n = int(counts[expert])
        blas.gemm_nt(n, 2 * inter, h, xs.data.ptr + row * h * 2, h,
                     gate_up[expert].data.ptr, h, gu.data.ptr + row * 4 * inter, 2 * inter,
                     CUDA_R_16BF)  # fmt: skip
        row += n
    act = k.empty((pairs, inter), BF16)  # [P, I]
    n_act = pairs * inter
    k.launch("elementwise.cu", "silu_mul", (max(1, min(-(-n_act // 256), 8 * k.num_sms)),), 256,
             (gu, act, inter, np.int64(n_act)))  # fmt: skip
    y = k.empty((pairs, h), np.float32)  # [P, H] expert outputs, rows in expert order
    row = 0
    for expert in np.flatnonzero(counts):
        n = int(counts[expert])
        blas.gemm_nt(n, h, inter, act.data.ptr + row * inter * 2, inter,
                     down[expert].data.ptr, inter, y.data.ptr + row * h * 4, h,
                     CUDA_R_32F)  # fmt: skip
        row += n
    pos = cp.empty(pairs, np.int32)
    pos[order] = cp.arange(pairs, dtype=np.int32)  # sorted row of each pair
    out = k.empty((t, h), BF16)
    k.launch("moe_prefill.cu", "moe_combine_sorted", (t,), 256,
             (y, pos, weights, out, h, top_k))  # fmt: skip
    return out
