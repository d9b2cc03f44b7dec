"""The prefill router (one float32 cuBLAS GEMM, then moe_topk) against the NumPy reference and
the decode kernels, which must choose the same experts but for near ties."""

from __future__ import annotations

import numpy as np
import pytest

from pdserve.backends import gpu_unavailable_reason
from pdserve.backends.numpy_ops import NumpyOps
from tests.gpu.bf16_reference import bf16_randn

REASON = gpu_unavailable_reason()
if REASON is not None:
    pytest.skip(f"GPU tests need CuPy and a CUDA GPU: {REASON}", allow_module_level=True)
else:
    import cupy as cp

    from pdserve.backends import cupy_moe, cupy_route_prefill

pytestmark = pytest.mark.gpu

CASES = [  # (tokens, hidden, experts, top_k, norm_min)
    (256, 2560, 64, 6, 1e-12),  # the model's shapes, the fewest tokens this path takes
    (1001, 2560, 64, 6, 1e-12),
    (300, 48, 8, 2, 0.95),
    (257, 100, 128, 8, 1e-12),  # H not a multiple of 8; the most experts the router takes
    (300, 72, 40, 32, 1e-12),  # the largest top_k
]


def near_ties(x, router, bias, k):
    """[T] bool: the reference's k-th and (k+1)-th biased scores (or any two of the first k)
    within 1e-5, where float32 summation order may flip a choice."""
    logits = x.astype(np.float64) @ router.T.astype(np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    biased = np.sort(p / p.sum(-1, keepdims=True) + bias, axis=-1)[:, ::-1]
    return np.abs(biased[:, :k] - biased[:, 1 : k + 1]).min(axis=-1) < 1e-5


@pytest.mark.parametrize("t,h,e,k,norm_min", CASES)
def test_prefill_route_matches_reference_and_decode_kernels(ops, rng, t, h, e, k, norm_min):
    x = bf16_randn(rng, t, h)
    router = (rng.standard_normal((e, h)) / np.sqrt(h)).astype(np.float32)
    bias = (0.05 * rng.standard_normal(e)).astype(np.float32)
    args = (ops.weight(x), ops.weight(router, fp32=True), ops.weight(bias, fp32=True), k, norm_min)
    w, ids = (ops.to_host(a) for a in cupy_route_prefill.moe_route(ops.k, *args))
    w_dec, ids_dec = (ops.to_host(a) for a in cupy_moe.moe_route(ops.k, *args))
    w_ref, ids_ref = NumpyOps().moe_route(x, router, bias, k, norm_min)
    assert w.dtype == np.float32 and ids.dtype == np.int32 and ids.shape == (t, k)
    assert all(len(set(row)) == k for row in ids.tolist())
    fine = ~near_ties(x, router, bias, k)
    np.testing.assert_array_equal(ids[fine], ids_ref[fine])
    np.testing.assert_array_equal(ids[fine], ids_dec[fine])
    np.testing.assert_allclose(w[fine], w_ref[fine], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(w[fine], w_dec[fine], rtol=1e-5, atol=1e-6)


def test_ops_route_long_passes_by_gemm_and_captures_by_decode_kernels(ops, rng):
    """CupyOps.moe_route takes this path from MIN_TOKENS tokens, the decode kernels below and
    under a CUDA-graph capture (where the GEMM path would also capture, but decode graphs are
    sized for the kernels)."""
    t, h, e, k = cupy_route_prefill.MIN_TOKENS, 256, 16, 4
    x = ops.weight(bf16_randn(rng, t, h))
    router = ops.weight((rng.standard_normal((e, h)) / 16).astype(np.float32), fp32=True)
    bias = ops.weight(np.zeros(e, np.float32), fp32=True)
    w, ids = ops.moe_route(x, router, bias, k, 1e-12)
    w_new, ids_new = cupy_route_prefill.moe_route(ops.k, x, router, bias, k, 1e-12)
    np.testing.assert_array_equal(ops.to_host(ids), ops.to_host(ids_new))
    np.testing.assert_array_equal(ops.to_host(w), ops.to_host(w_new))
    assert not cupy_route_prefill.applies(t - 1)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        try:
            capturing = cupy_route_prefill.applies(t)
        finally:
            stream.end_capture()
    assert not capturing
