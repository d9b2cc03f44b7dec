"""The decode weight-streaming kernels (csrc/gemv.cu, moe_decode.cu, the routing of moe.cu) against
the NumPy references, on fresh random data of odd sizes with every output starting as NaN, and
each replayed under a CUDA graph against its eager result."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from pdserve.backends import gpu_unavailable_reason
from pdserve.backends.numpy_ops import NumpyOps
from tests.gpu.bf16_reference import (
    Bf16ReferenceOps,
    assert_bf16_close,
    bf16_randn,
    round_bf16,
)

REASON = gpu_unavailable_reason()
if REASON is not None:
    pytest.skip(f"GPU tests need CuPy and a CUDA GPU: {REASON}", allow_module_level=True)
else:
    import cupy as cp

    from pdserve.backends import cupy_gemv, cupy_moe
    from pdserve.backends.cupy_kernels import BF16, bf16_bits_to_f32
    from pdserve.backends.cupy_ops import CupyLinear

pytestmark = pytest.mark.gpu
ref = NumpyOps()
ref_bf16 = Bf16ReferenceOps()


def replay(fn: Callable[[], tuple], update: Callable[[], None]) -> tuple[np.ndarray, ...]:
    """fn's outputs (device arrays) from a CUDA graph of it, replayed after `update` changed its
    inputs in place. A private pool holds what the capture allocates; an eager run in that pool
    first compiles the kernels and caches the blocks the capture will take."""
    pool = cp.cuda.MemoryPool()
    stream = cp.cuda.Stream(non_blocking=True)
    with cp.cuda.using_allocator(pool.malloc), stream:
        fn()
        stream.synchronize()
        stream.begin_capture()
        outs = fn()
        graph = stream.end_capture()
        update()
        stream.synchronize()
        graph.launch(stream)
        stream.synchronize()
        return tuple(_host(o) for o in outs)


def _host(x: cp.ndarray) -> np.ndarray:
    return bf16_bits_to_f32(cp.asnumpy(x.view(np.uint16))) if x.dtype == BF16 else cp.asnumpy(x)


# -- dense GEMV ----------------------------------------------------------------------------


@pytest.mark.parametrize("n,k", [(333, 200), (37, 2560), (40, 12288)])
@pytest.mark.parametrize("t", [*range(1, 17), 23, 32])
def test_gemv_every_batch_size(ops, rng, t, n, k):
    x, w = bf16_randn(rng, t, k), bf16_randn(rng, n, k)
    want = x.astype(np.float64) @ w.T.astype(np.float64)
    xd, wd = ops.weight(x), ops.weight(w)
    got = cupy_gemv.gemv(ops.k, xd, wd, BF16)
    assert got.dtype == BF16 and got.shape == (t, n)
    assert_bf16_close(ops.to_host(got), want.astype(np.float32))
    logits = cupy_gemv.gemv(ops.k, xd, wd, np.dtype(np.float32))  # the lm_head's float32 output
    assert logits.dtype == np.float32
    np.testing.assert_allclose(ops.to_host(logits), want, rtol=1e-4, atol=1e-5 * np.sqrt(k))


@pytest.mark.parametrize("warps", [1, 3, 16])
def test_gemv_split_k_over_warps(ops, rng, warps):
    t, n, k = 5, 2560, 2560  # o_proj's shape: the default plan splits K across warps
    x, w = bf16_randn(rng, t, k), bf16_randn(rng, n, k)
    want = x.astype(np.float64) @ w.T.astype(np.float64)
    got = cupy_gemv.gemv(ops.k, ops.weight(x), ops.weight(w), np.dtype(np.float32), warps=warps)
    np.testing.assert_allclose(ops.to_host(got), want, rtol=1e-4, atol=1e-5 * np.sqrt(k))


@pytest.mark.parametrize("extra", [24, 9])
def test_linear_on_row_strided_x(ops, rng, extra):
    """A column slice of a wider activation: read in place when its rows stay 16-byte aligned
    (extra = 24), copied first otherwise (extra = 9)."""
    t, n, k = 6, 77, 200
    x, w = bf16_randn(rng, t, k), bf16_randn(rng, n, k)
    wide = ops.weight(np.concatenate([x, bf16_randn(rng, t, extra)], axis=1))
    assert cupy_gemv.rows_ok(wide[:, :k]) == (extra % 8 == 0)
    got = ops.linear(wide[:, :k], ops.linear_weight(w, None))
    assert_bf16_close(ops.to_host(got), x @ w.T)


@pytest.mark.parametrize("t,k", [(3, 201), (33, 200), (1, 36)])
def test_linear_outside_the_gemv_falls_back_to_cublas(ops, rng, t, k):
    """K not a multiple of 8, or more rows than GEMV_MAX_TOKENS: cuBLAS, same results."""
    x, w = bf16_randn(rng, t, k), bf16_randn(rng, 59, k)
    got = ops.linear(ops.weight(x), ops.linear_weight(w, None))
    assert_bf16_close(ops.to_host(got), x @ w.T)
    logits = ops.linear(ops.weight(x), ops.weight(w))
    np.testing.assert_allclose(ops.to_host(logits), x @ w.T, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("t", [1, 7, 32])
def test_gemv_replayed_in_a_cuda_graph(ops, rng, t):
    n, k = 301, 264
    xd, wd = ops.weight(bf16_randn(rng, t, k)), ops.weight(bf16_randn(rng, n, k))
    new_x = ops.weight(bf16_randn(rng, t, k))

    def run() -> tuple:
        return ops.linear(xd, CupyLinear(wd)), ops.linear(xd, wd)  # bf16, float32 (lm_head)

    def update() -> None:
        xd[...] = new_x

    got = replay(run, update)
    eager = [ops.to_host(o) for o in run()]
    for g, e in zip(got, eager):
        np.testing.assert_array_equal(g, e)
    assert_bf16_close(got[0], ops.to_host(new_x) @ ops.to_host(wd).T)


# -- routing -------------------------------------------------------------------------------


def route_reference_check(x, router, bias, k, norm_min, w, ids):
    """ids equal the reference's choices except where its biased scores nearly tie; weights
    equal its weights there."""
    t, e = x.shape[0], router.shape[0]
    w_ref, ids_ref = ref.moe_route(x, router, bias, k, norm_min)
    assert w.dtype == np.float32 and ids.shape == (t, k)
    assert ((ids >= 0) & (ids < e)).all()
    assert all(len(set(row)) == k for row in ids.tolist())
    logits = x.astype(np.float64) @ router.T.astype(np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    biased = np.sort(p / p.sum(-1, keepdims=True) + bias, axis=-1)[:, ::-1]
    tie = np.abs(biased[:, :k] - biased[:, 1 : k + 1]).min(axis=-1) < 1e-5
    np.testing.assert_array_equal(ids[~tie], ids_ref[~tie])
    np.testing.assert_allclose(w[~tie], w_ref[~tie], rtol=1e-4, atol=1e-6)


ROUTE_CASES = [  # (tokens, hidden, experts, top_k, norm_min)
    (1, 2560, 64, 6, 1e-12),
    (128, 2560, 64, 6, 1e-12),
    (37, 64, 12, 4, 1e-12),
    (9, 48, 8, 2, 0.95),
    (5, 100, 128, 8, 1e-12),  # H not a multiple of 8; the most experts the router takes
    (3, 72, 40, 32, 1e-12),  # the largest top_k
]


@pytest.mark.parametrize("t,h,e,k,norm_min", ROUTE_CASES)
def test_moe_route_matches_reference(ops, rng, t, h, e, k, norm_min):
    x = bf16_randn(rng, t, h)
    router = (rng.standard_normal((e, h)) / np.sqrt(h)).astype(np.float32)
    bias = (0.05 * rng.standard_normal(e)).astype(np.float32)
    w, ids = ops.moe_route(ops.weight(x), ops.weight(router, fp32=True),
                           ops.weight(bias, fp32=True), k, norm_min)  # fmt: skip
    route_reference_check(x, router, bias, k, norm_min, ops.to_host(w), ops.to_host(ids))


# -- routed experts, decode path -----------------------------------------------------------


def make_experts(rng, e, h, i):
    gate_up = round_bf16((rng.standard_normal((e, 2 * i, h)) / np.sqrt(h)).astype(np.float32))
    down = round_bf16((rng.standard_normal((e, h, i)) / np.sqrt(i)).astype(np.float32))
    return gate_up, down


def skewed_ids(rng, t, e, k):
    """Expert popularity falling off fast: the first experts get most tokens (more than one
    chunk of 32 at T = 128), many experts get none."""
    pop = 1.0 / np.arange(1, e + 1) ** 1.5
    return np.stack([rng.choice(e, k, replace=False, p=pop / pop.sum()) for _ in range(t)])


def make_shared(rng, h, i_s):
    gate_up = round_bf16((rng.standard_normal((2 * i_s, h)) / np.sqrt(h)).astype(np.float32))
    down = round_bf16((rng.standard_normal((h, i_s)) / np.sqrt(i_s)).astype(np.float32))
    return gate_up, down


def draw_ids(rng, t, e, k, routing):
    if routing == "skewed":
        return skewed_ids(rng, t, e, k)
    return np.stack([rng.choice(e, k, replace=False) for _ in range(t)])


@pytest.mark.parametrize("t", [1, 3, 12, 32, 128, 200])
@pytest.mark.parametrize("routing", ["skewed", "uniform"])
def test_decode_experts(ops, rng, t, routing):
    # H, I multiples of 8 but not of 16 or 32; T = 200 stays below the experts' cuBLAS path
    # (256 tokens, cupy_moe_prefill) and takes 7 chunks of 32 tokens in the shared slots.
    # The shared intermediate (520) is 2.6 routed ones: its third slot is partial.
    h, i, i_s, e, k = 264, 200, 520, 64, 6
    x = bf16_randn(rng, t, h)
    gate_up, down = make_experts(rng, e, h, i)
    shared = make_shared(rng, h, i_s)
    ids = draw_ids(rng, t, e, k, routing)
    w = rng.random((t, k)).astype(np.float32)
    w /= w.sum(-1, keepdims=True)
    gd, dd = ops.linear_weight(gate_up, None), ops.linear_weight(down, None)
    args = (ops.weight(x), ops.to_device(w), ops.to_device(ids), gd, dd)
    got = ops.moe_experts(*args)
    assert_bf16_close(ops.to_host(got), ref_bf16.moe_experts(x, w, ids, gate_up, down))
    both = tuple(ops.linear_weight(m, None) for m in shared)
    got = ops.moe_experts(*args, both)
    want = ref_bf16.moe_experts(x, w, ids, gate_up, down, shared)
    assert_bf16_close(ops.to_host(got), want)


@pytest.mark.parametrize("gate_up_warps,down_warps", [(1, 1), (3, 3), (4, 2)])
def test_decode_experts_launch_variants(ops, rng, gate_up_warps, down_warps):
    t, h, i, e, k = 20, 136, 104, 16, 4
    x = bf16_randn(rng, t, h)
    gate_up, down = make_experts(rng, e, h, i)
    shared = make_shared(rng, h, 2 * i)
    ids = skewed_ids(rng, t, e, k)
    w = rng.random((t, k)).astype(np.float32)
    want = ref_bf16.moe_experts(x, w, ids, gate_up, down, shared)
    got = cupy_moe.decode_experts(
        ops.k, ops.weight(x), ops.to_device(w), ops.to_device(ids.astype(np.int32)),
        ops.weight(gate_up), ops.weight(down), tuple(ops.weight(m) for m in shared),
        gate_up_warps, down_warps,
    )  # fmt: skip
    assert_bf16_close(ops.to_host(got), want)


@pytest.mark.parametrize("t", [1, 32])
def test_decode_experts_at_model_size(ops, rng, t):
    """ERNIE-4.5-21B-A3B's expert shapes (fewer experts), its two shared experts."""
    h, i, e, k = 2560, 1536, 8, 6
    x = bf16_randn(rng, t, h)
    gate_up, down = make_experts(rng, e, h, i)
    shared = make_shared(rng, h, 2 * i)
    ids = np.stack([rng.choice(e, k, replace=False) for _ in range(t)])
    w = rng.random((t, k)).astype(np.float32)
    want = ref_bf16.moe_experts(x, w, ids, gate_up, down, shared)
    gd, dd = ops.linear_weight(gate_up, None), ops.linear_weight(down, None)
    both = tuple(ops.linear_weight(m, None) for m in shared)
    got = ops.moe_experts(ops.weight(x), ops.to_device(w), ops.to_device(ids), gd, dd, both)
    assert_bf16_close(ops.to_host(got), want)


@pytest.mark.parametrize("t", [1, 3, 32, 128])
def test_moe_layer_replayed_in_a_cuda_graph(ops, rng, t):
    """Route + experts captured as one graph: the same ids, weights and outputs as eager on
    the new inputs, and the output right against the reference."""
    h, i, e, k = 264, 200, 64, 6
    router = (rng.standard_normal((e, h)) / np.sqrt(h)).astype(np.float32)
    bias = (0.05 * rng.standard_normal(e)).astype(np.float32)
    gate_up, down = make_experts(rng, e, h, i)
    rd, bd = ops.weight(router, fp32=True), ops.weight(bias, fp32=True)
    gd, dd = ops.linear_weight(gate_up, None), ops.linear_weight(down, None)
    shared = make_shared(rng, h, 2 * i)
    both = tuple(ops.linear_weight(m, None) for m in shared)
    xd = ops.weight(bf16_randn(rng, t, h))
    new_x = bf16_randn(rng, t, h)
    new_xd = ops.weight(new_x)

    def run() -> tuple:
        w, ids = ops.moe_route(xd, rd, bd, k, 1e-12)
        return w, ids, ops.moe_experts(xd, w, ids, gd, dd, both)

    def update() -> None:
        xd[...] = new_xd

    w, ids, out = replay(run, update)
    eager = [ops.to_host(o) for o in run()]
    for g, want in zip((w, ids, out), eager):
        np.testing.assert_array_equal(g, want)
    route_reference_check(new_x, router, bias, k, 1e-12, w, ids)
    assert_bf16_close(out, ref_bf16.moe_experts(new_x, w, ids, gate_up, down, shared))
