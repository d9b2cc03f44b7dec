"""The router of a long prefill: one float32 cuBLAS GEMM for the logits, then moe_topk.

The decode router (cupy_moe.moe_route, csrc/moe.cu) reduces each (token, expert, 256-wide
slice of H) over a warp: right for a few tokens, whose cost is reading the router, but at
thousands of tokens it re-reads x once per expert and runs at a few percent of the float32
rate (546 us a layer at 8192 tokens on the H200; 138 us here). Here x is widened to float32
once and multiplied by the float32 router in one cublasGemmEx with CUBLAS_COMPUTE_32F (true
float32, never tf32, so the expert choices match the decode kernels' but for near ties), and
moe_topk reads the logits as a single split. Only for passes of `MIN_TOKENS` tokens or more
outside a CUDA-graph capture: decode graphs keep the decode kernels.
"""

from __future__ import annotations

import cupy as cp
import numpy as np

from pdserve.backends.cublas_capturable import CUDA_R_32F, current
from pdserve.backends.cupy_kernels import Kernels, row_major
from pdserve.backends.cupy_moe import check_route, topk

# H200, H = 2560, 64 experts: decode kernels 43 / 61 / 110 / 546 us at 512 / 1024 / 2048 / 8192
# tokens, this path 72 / 60 / 65 / 138 us.
MIN_TOKENS = 1024


def applies(t: int) -> bool:
    """Whether routing t tokens takes this path."""
    return t >= MIN_TOKENS and not cp.cuda.get_current_stream().is_capturing()


def moe_route(
    k: Kernels, x: cp.ndarray, router: cp.ndarray, bias: cp.ndarray, top_k: int, norm_min: float
) -> tuple[cp.ndarray, cp.ndarray]:
    """x [T, H] (read as bf16, like the decode router), router [E, H] float32, bias [E] float32
    -> (weights [T, K] float32, expert ids [T, K] int32): cupy_moe.moe_route's contract."""
    x = row_major(x)
    t, h = x.shape
    e = router.shape[0]
    check_route(e, top_k)
    xf = cp.empty((t, h), np.float32)  # [T, H], every element written
    logits = k.empty((1, t, e), np.float32)  # [1, T, E]: one slice for moe_topk
    if t > 0:
        k.launch("moe_chunks.cu", "bf16_to_f32", (min(-(-t * h // 2048), 8 * k.num_sms),), 256,
                 (x, xf, np.int64(t * h)))  # fmt: skip
        current().gemm_nt(t, e, h, xf.data.ptr, h, row_major(router, np.float32).data.ptr, h,
                          logits.data.ptr, e, CUDA_R_32F, in_type=CUDA_R_32F)  # fmt: skip
    return topk(k, logits, bias, top_k, norm_min)
