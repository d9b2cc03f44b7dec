"""The prefill experts path (tokens sorted by expert, one cuBLAS GEMM per expert) against the
NumPy reference, on fresh random data with every output poisoned first."""

from __future__ import annotations

import numpy as np
import pytest

from pdserve.backends import gpu_unavailable_reason
from pdserve.backends.numpy_ops import NumpyOps
from tests.gpu.bf16_reference import round_bf16

REASON = gpu_unavailable_reason()
if REASON is not None:
    pytest.skip(f"GPU tests need CuPy and a CUDA GPU: {REASON}", allow_module_level=True)
else:
    import cupy as cp

    from pdserve.backends.cupy_ops import CupyOps

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("skew", [0.0, 1.5], ids=["balanced", "skewed"])
@pytest.mark.parametrize(
    "t,h,i,e,k",
    [(256, 64, 32, 8, 2), (700, 136, 40, 64, 6), (301, 72, 24, 12, 4), (2049, 256, 128, 64, 6)],
)
def test_prefill_experts_match_the_reference(rng, t, h, i, e, k, skew):
    """Balanced routing takes the padded batched GEMM, skewed routing the grouped one."""
    ops = CupyOps(poison=True)
    x = round_bf16(rng.standard_normal((t, h)).astype(np.float32))
    gate_up = round_bf16((rng.standard_normal((e, 2 * i, h)) / np.sqrt(h)).astype(np.float32))
    down = round_bf16((rng.standard_normal((e, h, i)) / np.sqrt(i)).astype(np.float32))
    pop = 1.0 / np.arange(1, e + 1) ** skew  # skewed: some experts get many rows, some none
    ids = np.stack([rng.choice(e, k, replace=False, p=pop / pop.sum()) for _ in range(t)])
    w = rng.random((t, k)).astype(np.float32)
    w /= w.sum(-1, keepdims=True)
    want = NumpyOps().moe_experts(x, w, ids, gate_up, down)
    args = (ops.weight(x), ops.to_device(w), ops.to_device(ids.astype(np.int32)))
    got = ops.moe_experts(*args, ops.linear_weight(gate_up, None), ops.linear_weight(down, None))
    got = ops.to_host(got)
    assert np.isfinite(got).all(), "unwritten rows"
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err <= 1e-2, f"relative error {err:.3g}"


def test_prefill_path_is_taken_only_for_long_passes_outside_capture():
    from pdserve.backends import cupy_moe_prefill

    assert cupy_moe_prefill.applies(256) and not cupy_moe_prefill.applies(255)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        try:
            capturing = cupy_moe_prefill.applies(4096)
        finally:
            stream.end_capture()
    assert not capturing
