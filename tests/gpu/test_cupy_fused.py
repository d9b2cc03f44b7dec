"""Fused GPU ops against the unfused ops they replace: bit-identical results."""

from __future__ import annotations

import numpy as np
import pytest

from pdserve.backends import gpu_unavailable_reason
from pdserve.backends.base import Ops
from tests.gpu.bf16_reference import round_bf16

REASON = gpu_unavailable_reason()
if REASON is not None:
    pytest.skip(f"GPU tests need CuPy and a CUDA GPU: {REASON}", allow_module_level=True)
else:
    import cupy as cp

    from pdserve.backends.cupy_ops import CupyOps

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("t,heads,kv_heads,d", [(1, 20, 4, 128), (37, 6, 2, 64), (5, 4, 4, 16)])
def test_rope_write_kv_equals_rope_then_write_kv(rng, t, heads, kv_heads, d):
    ops = CupyOps(poison=True)
    blocks, bs = 7, 16
    width = (heads + 2 * kv_heads) * d
    qkv = ops.weight(round_bf16(rng.standard_normal((t, width + 8)).astype(np.float32)))[:, :width]
    positions = ops.to_device(rng.integers(0, 5000, t).astype(np.int64))
    slots = rng.permutation(blocks * bs)[:t].astype(np.int64)
    slots[::3] = -1  # padding rows write nothing
    slots = ops.to_device(slots)
    pools = [ops.alloc_kv_cache((2, blocks, bs, kv_heads, d)) for _ in range(2)]
    for pool in pools:
        pool.view(np.uint16)[...] = 0x3F80  # 1.0 everywhere: untouched slots stay 1.0
    fused = ops.rope_write_kv(qkv, heads, kv_heads, positions, 5e5, pools[0], slots)
    plain = Ops.rope_write_kv(ops, qkv, heads, kv_heads, positions, 5e5, pools[1], slots)
    assert cp.array_equal(fused.view(np.uint16), plain.view(np.uint16))
    assert cp.array_equal(pools[0].view(np.uint16), pools[1].view(np.uint16))
    written = (pools[0].view(np.uint16) != 0x3F80).any(axis=(0, 3, 4))  # [blocks, bs]
    assert int(written.sum()) <= t - len(range(0, t, 3))  # the real rows' slots at most


@pytest.mark.parametrize("t,heads,kv_heads,d,h", [(1, 20, 4, 128, 2560), (3, 6, 2, 64, 200),
                                                  (8, 4, 1, 16, 72)])  # fmt: skip
def test_qkv_rope_write_kv_equals_linear_then_rope_write_kv(rng, t, heads, kv_heads, d, h):
    """The GEMV with RoPE and the KV write as its epilogue (decode batches) against the GEMV,
    then rope_write_kv: q and the whole pool bit-identical, padding rows writing nothing."""
    ops = CupyOps(poison=True)
    blocks, bs = 5, 16
    width = (heads + 2 * kv_heads) * d
    x = ops.weight(round_bf16(rng.standard_normal((t, h)).astype(np.float32)))
    w = ops.linear_weight(rng.standard_normal((width, h)).astype(np.float32) * 0.05, None)
    positions = ops.to_device(rng.integers(0, 5000, t).astype(np.int64))
    slots = rng.permutation(blocks * bs)[:t].astype(np.int64)
    slots[1::2] = -1
    slots = ops.to_device(slots)
    pools = [ops.alloc_kv_cache((2, blocks, bs, kv_heads, d)) for _ in range(2)]
    for pool in pools:
        pool.view(np.uint16)[...] = 0x3F80
    fused = ops.qkv_rope_write_kv(x, w, heads, kv_heads, positions, 1e4, pools[0], slots)
    plain = Ops.qkv_rope_write_kv(ops, x, w, heads, kv_heads, positions, 1e4, pools[1], slots)
    assert fused.shape == (t, heads, d)
    assert cp.array_equal(fused.view(np.uint16), plain.view(np.uint16))
    assert cp.array_equal(pools[0].view(np.uint16), pools[1].view(np.uint16))
    written = (pools[0].view(np.uint16) != 0x3F80).any(axis=(0, 3, 4))
    assert int(written.sum()) == len(range(0, t, 2))  # each real row's slot, nothing else


@pytest.mark.parametrize("t", [1, 7, 40])
@pytest.mark.parametrize("res_f32", [False, True])
def test_moe_add_rms_norm_equals_moe_then_add_rms_norm(rng, t, res_f32):
    """The decode experts' combine with the residual add and the norm in its launch against
    moe, then add_rms_norm: both outputs bit-identical, the shared experts included."""
    ops = CupyOps(poison=True)
    h, i, i_s, e, k = 264, 200, 400, 16, 6

    def bf16(*shape, scale=1.0):
        return ops.weight(round_bf16(rng.standard_normal(shape).astype(np.float32) * scale))

    x = bf16(t, h)
    router = ops.weight(rng.standard_normal((e, h)).astype(np.float32) * 0.1, fp32=True)
    bias = ops.weight(rng.standard_normal(e).astype(np.float32) * 0.01, fp32=True)
    gate_up, down = (ops.linear_weight(rng.standard_normal(s).astype(np.float32) * 0.05, None)
                     for s in ((e, 2 * i, h), (e, h, i)))  # fmt: skip
    shared = tuple(ops.linear_weight(rng.standard_normal(s).astype(np.float32) * 0.05, None)
                   for s in ((2 * i_s, h), (h, i_s)))  # fmt: skip
    residual = rng.standard_normal((t, h)).astype(np.float32)
    residual = ops.to_device(residual) if res_f32 else bf16(t, h)
    weight = bf16(h, scale=0.5)
    moe = (x, router, bias, k, 1e-12, gate_up, down, shared)
    fused = ops.moe_add_rms_norm(*moe, residual, weight, 1e-5)
    plain = Ops.moe_add_rms_norm(ops, *moe, residual, weight, 1e-5)
    assert cp.array_equal(fused[0].view(np.uint16), plain[0].view(np.uint16))
    assert fused[1].dtype == plain[1].dtype == np.float32
    assert cp.array_equal(fused[1], plain[1])
