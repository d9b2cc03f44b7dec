"""The prefill experts paths (pairs grouped by expert, padded or chunked layouts, cuBLAS GEMMs)
against the NumPy reference, on fresh random data with every output poisoned first."""

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

    from pdserve.backends import cupy_moe_prefill
    from pdserve.backends.cupy_ops import CupyOps

pytestmark = pytest.mark.gpu

CASES = [  # (tokens, hidden, intermediate, experts, top_k): odd token counts, small chunks
    (256, 64, 32, 8, 2),
    (700, 136, 40, 64, 6),
    (301, 72, 24, 12, 4),
    (2049, 256, 128, 64, 6),
    (300, 50, 30, 6, 2),  # rows not multiples of 8 elements: the kernels' element-wise loops
]


def make_case(rng, t, h, i, e, k, law):
    """x, weights, ids, gate_up, down; `law` uniform, skewed (a few experts get most pairs),
    or holes (experts 1 and E - 1 get none)."""
    x = round_bf16(rng.standard_normal((t, h)).astype(np.float32))
    gate_up = round_bf16((rng.standard_normal((e, 2 * i, h)) / np.sqrt(h)).astype(np.float32))
    down = round_bf16((rng.standard_normal((e, h, i)) / np.sqrt(i)).astype(np.float32))
    pop = 1.0 / np.arange(1, e + 1) ** (1.5 if law == "skewed" else 0.0)
    if law == "holes":
        pop[[1, e - 1]] = 0.0
    ids = np.stack([rng.choice(e, k, replace=False, p=pop / pop.sum()) for _ in range(t)])
    w = rng.random((t, k)).astype(np.float32)
    w /= w.sum(-1, keepdims=True)
    return x, w, ids.astype(np.int32), gate_up, down


def check(got, want):
    assert np.isfinite(got).all(), "unwritten rows"
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err <= 1e-2, f"relative error {err:.3g}"


@pytest.mark.parametrize("law", ["uniform", "skewed", "holes"])
@pytest.mark.parametrize("t,h,i,e,k", CASES)
def test_prefill_experts_match_the_reference(rng, t, h, i, e, k, law):
    """Through CupyOps, whose dispatch picks the path (padded or chunked)."""
    ops = CupyOps(poison=True)
    x, w, ids, gate_up, down = make_case(rng, t, h, i, e, k, law)
    want = NumpyOps().moe_experts(x, w, ids, gate_up, down)
    args = (ops.weight(x), ops.to_device(w), ops.to_device(ids))
    experts = (ops.linear_weight(gate_up, None), ops.linear_weight(down, None))
    got = ops.moe_experts(*args, *experts)
    check(ops.to_host(got), want)
    # with the shared experts, which run while the host waits for the counts, added in combine
    shared = tuple(
        round_bf16(rng.standard_normal(shape).astype(np.float32) / np.sqrt(shape[1]))
        for shape in ((4 * i, h), (h, 2 * i))
    )
    want = NumpyOps().moe_experts(x, w, ids, gate_up, down, shared)
    got = ops.moe_experts(*args, *experts, tuple(ops.linear_weight(m, None) for m in shared))
    check(ops.to_host(got), want)


PATHS = [("padded", 0), ("chunked", 128), ("chunked", 256), ("chunked", 16)]


@pytest.mark.parametrize("path,chunk", PATHS)
@pytest.mark.parametrize("law", ["uniform", "skewed", "holes"])
def test_every_path_matches_the_reference(rng, path, chunk, law):
    """Each path forced (padded falls back to chunked where an expert got no pair)."""
    ops = CupyOps(poison=True)
    x, w, ids, gate_up, down = make_case(rng, 517, 72, 40, 16, 4, law)
    want = NumpyOps().moe_experts(x, w, ids, gate_up, down)
    d = ops.to_device
    got = cupy_moe_prefill.moe_experts(ops.k, ops.weight(x), d(w), d(ids), ops.weight(gate_up),
                                       ops.weight(down), path, chunk or 128)  # fmt: skip
    check(ops.to_host(got), want)


def test_prefill_path_is_taken_only_for_long_passes_outside_capture():
    assert cupy_moe_prefill.applies(256) and not cupy_moe_prefill.applies(255)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        try:
            capturing = cupy_moe_prefill.applies(4096)
        finally:
            stream.end_capture()
    assert not capturing
