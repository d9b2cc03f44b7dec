"""Every op of the cupy backend against the NumPy reference, on fresh random data of odd sizes,
with every output starting as NaN. Inputs are bf16-exact, so both backends see the same values
and differ by output rounding and summation order only."""

from __future__ import annotations

import numpy as np
import pytest

from pdserve.backends import get_ops, gpu_unavailable_reason
from pdserve.backends.numpy_ops import NumpyOps
from pdserve.model.forward_batch import ForwardBatch
from tests.gpu.bf16_reference import assert_bf16_close, bf16_randn, round_bf16

REASON = gpu_unavailable_reason()
if REASON is not None:
    pytest.skip(f"GPU tests need CuPy and a CUDA GPU: {REASON}", allow_module_level=True)
else:
    import cupy as cp


pytestmark = pytest.mark.gpu
ref = NumpyOps()


def test_get_ops_picks_cupy_only_when_asked():
    assert get_ops("cupy").name == "cupy"
    assert get_ops("auto").name == "cupy"  # a GPU is visible (the module skips otherwise)
    assert get_ops("auto", tensor_parallel_size=2).name == "numpy"  # no all-reduce on GPUs yet
    assert get_ops("numpy").name == "numpy"


def test_embedding_gathers_rows(ops, rng):
    table = rng.standard_normal((301, 72)).astype(np.float32)
    ids = rng.integers(0, 301, 37)
    got = ops.to_host(ops.embedding(ops.weight(table), ops.to_device(ids)))
    np.testing.assert_array_equal(got, round_bf16(table)[ids])


@pytest.mark.parametrize("t,h", [(1, 64), (37, 200), (5, 2560)])
def test_rms_norm_and_fused_add(ops, rng, t, h):
    x, res, w = bf16_randn(rng, t, h, scale=3), bf16_randn(rng, t, h), bf16_randn(rng, h)
    got = ops.to_host(ops.rms_norm(ops.weight(x), ops.weight(w), 1e-5))
    assert_bf16_close(got, ref.rms_norm(x, w, 1e-5))
    want_norm, want_res = ref.add_rms_norm(x, res, w, 1e-5)
    # the residual arrives bf16 (after the embedding) or float32 (after an earlier add)
    for residual in (ops.weight(res), cp.asarray(res)):
        norm, new_res = ops.add_rms_norm(ops.weight(x), residual, ops.weight(w), 1e-5)
        assert new_res.dtype == np.float32
        np.testing.assert_allclose(ops.to_host(new_res), want_res, rtol=1e-6)
        assert_bf16_close(ops.to_host(norm), want_norm)


@pytest.mark.parametrize("t", [1, 3, 37])
def test_linear_bf16_and_float32_logits(ops, rng, t):
    x, w = bf16_randn(rng, t, 200), bf16_randn(rng, 333, 200)
    want = x @ w.T
    assert_bf16_close(ops.to_host(ops.linear(ops.weight(x), ops.linear_weight(w, None))), want)
    logits = ops.linear(ops.weight(x), ops.weight(w))  # a plain weight: the lm_head
    assert logits.dtype == np.float32
    np.testing.assert_allclose(ops.to_host(logits), want, rtol=1e-4, atol=1e-4)
    # rows with a stride longer than the row (a column slice of a wider activation)
    wide = ops.weight(np.concatenate([x, bf16_randn(rng, t, 9)], axis=1))
    assert_bf16_close(ops.to_host(ops.linear(wide[:, :200], ops.linear_weight(w, None))), want)


def test_quantized_linear_weights_are_refused(ops, rng):
    with pytest.raises(ValueError, match="--quantization wint8.*cupy"):
        ops.linear_weight(rng.standard_normal((8, 16)).astype(np.float32), "wint8")


@pytest.mark.parametrize("heads,d", [(5, 16), (3, 128)])
def test_rope_on_a_strided_view(ops, rng, heads, d):
    t = 37
    qkv = bf16_randn(rng, t, (heads + 2) * d)
    pos = rng.integers(0, 131072, t)
    pos[:3] = [0, 1, 131071]
    x_dev = ops.weight(qkv)[:, : heads * d].reshape(t, heads, d)  # rows strided like q of qkv
    got = ops.to_host(ops.rope(x_dev, ops.to_device(pos), 500000.0))
    want = ref.rope(qkv[:, : heads * d].reshape(t, heads, d), pos, 500000.0)
    assert_bf16_close(got, want)


def test_silu_mul(ops, rng):
    gu = bf16_randn(rng, 37, 90, scale=2)
    assert_bf16_close(ops.to_host(ops.silu_mul(ops.weight(gu))), ref.silu_mul(gu))


# -- KV write and paged attention ---------------------------------------------------------


def make_batch(to_device, seqs: list[tuple[int, int]], block_size: int, tables: list[list[int]]):
    """A ForwardBatch of sequences (cached, new): the new tokens are the last of each context."""
    starts, positions, slots = [0], [], []
    for (cached, new), table in zip(seqs, tables):
        pos = np.arange(cached, cached + new)
        positions.append(pos)
        slots.append(np.asarray(table)[pos // block_size] * block_size + pos % block_size)
        starts.append(starts[-1] + new)
    lens = [c + n for c, n in seqs]
    width = max(len(tb) for tb in tables)
    bt = np.zeros((len(seqs), width), np.int32)
    for s, tb in enumerate(tables):
        bt[s, : len(tb)] = tb
    t = starts[-1]
    return ForwardBatch(
        input_ids=to_device(np.zeros(t, np.int64)),
        positions=to_device(np.concatenate(positions).astype(np.int64)),
        slot_mapping=to_device(np.concatenate(slots).astype(np.int64)),
        query_start_loc=to_device(np.asarray(starts, np.int32)),
        seq_lens=to_device(np.asarray(lens, np.int32)),
        block_tables=to_device(bt),
        logits_indices=to_device(np.asarray([s - 1 for s in starts[1:]], np.int64)),
        block_size=block_size,
        query_start_loc_host=starts,
        seq_lens_host=lens,
    )


ATTENTION_CASES = {
    # name: (sequences (cached, new), heads, kv_heads, head_dim, block_size)
    "prefill_with_prefixes": ([(0, 37), (21, 13), (50, 1), (5, 64)], 4, 2, 16, 16),
    "gqa5_d128": ([(17, 9), (0, 3), (130, 1), (64, 64)], 10, 2, 128, 16),
    "decode_long_split": ([(1000, 1), (77, 1), (300, 1), (15, 1), (16, 1)], 8, 1, 64, 16),
    "decode_gqa5_d128": ([(2047, 1), (129, 1), (1, 1)], 20, 4, 128, 64),
    "mixed_decode_and_prefill": ([(40, 1), (33, 20), (0, 7), (100, 45)], 6, 3, 32, 8),
    "mha_block1": ([(3, 2), (0, 5), (9, 1)], 4, 4, 8, 1),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_write_kv_and_paged_attention(ops, rng, case):
    seqs, heads, kv_heads, d, bs = ATTENTION_CASES[case]
    need = [-(-(c + n) // bs) for c, n in seqs]
    num_blocks = sum(need) + 3
    ids = rng.permutation(num_blocks).tolist()  # blocks in random order, some unused
    tables = []
    for n in need:
        tables.append(ids[:n])
        ids = ids[n:]
    t = sum(n for _, n in seqs)
    # a two-layer pool whose cached prefixes are random; layer 1 is the one under test
    pool = bf16_randn(rng, 2, 2, num_blocks, bs, kv_heads, d)
    q = bf16_randn(rng, t, heads, d)
    kv_new = bf16_randn(rng, t, 2 * kv_heads * d)  # k | v of each token, as in a qkv row
    k, v = kv_new[:, : kv_heads * d], kv_new[:, kv_heads * d :]
    scale = d**-0.5

    batch = make_batch(ref.to_device, seqs, bs, tables)
    pool_ref = pool.copy()
    ref.write_kv(pool_ref[1], k.reshape(t, kv_heads, d), v.reshape(t, kv_heads, d),
                 batch.slot_mapping)  # fmt: skip
    want = ref.paged_attention(q, pool_ref[1], batch, scale)

    gbatch = make_batch(ops.to_device, seqs, bs, tables)
    gpool = ops.weight(pool)
    gkv = ops.weight(kv_new)
    gk = gkv[:, : kv_heads * d].reshape(t, kv_heads, d)
    gv = gkv[:, kv_heads * d :].reshape(t, kv_heads, d)  # a strided view, as the model's v
    ops.write_kv(gpool[1], gk, gv, gbatch.slot_mapping)
    np.testing.assert_array_equal(ops.to_host(gpool), pool_ref)
    got = ops.to_host(ops.paged_attention(ops.weight(q), gpool[1], gbatch, scale))
    assert_bf16_close(got, want)


# -- MoE ----------------------------------------------------------------------------------


@pytest.mark.parametrize("t,h,e,k,norm_min", [(37, 64, 12, 4, 1e-12), (5, 2560, 64, 6, 1e-12),
                                              (9, 48, 8, 2, 0.95)])  # fmt: skip
def test_moe_route(ops, rng, t, h, e, k, norm_min):
    x = bf16_randn(rng, t, h)
    router = (rng.standard_normal((e, h)) / np.sqrt(h)).astype(np.float32)
    bias = (0.05 * rng.standard_normal(e)).astype(np.float32)
    w_ref, ids_ref = ref.moe_route(x, router, bias, k, norm_min)
    w, ids = ops.moe_route(ops.weight(x), ops.weight(router, fp32=True),
                           ops.weight(bias, fp32=True), k, norm_min)  # fmt: skip
    w, ids = ops.to_host(w), ops.to_host(ids)
    assert w.dtype == np.float32 and ids.shape == (t, k)
    # selections may differ only where the reference's biased scores nearly tie
    logits = x.astype(np.float64) @ router.T.astype(np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    biased = np.sort(p / p.sum(-1, keepdims=True) + bias, axis=-1)[:, ::-1]
    tie = np.abs(biased[:, :k] - biased[:, 1 : k + 1]).min(axis=-1) < 1e-5
    np.testing.assert_array_equal(ids[~tie], ids_ref[~tie])
    np.testing.assert_allclose(w[~tie], w_ref[~tie], rtol=1e-4, atol=1e-6)


MOE_CASES = [  # (tokens, hidden, intermediate, experts, top_k)
    (3, 64, 32, 8, 2),
    (37, 48, 24, 12, 4),
    (9, 72, 40, 16, 3),
    (300, 256, 96, 64, 6),  # streamed at any size below the prefill path's
    (21, 50, 30, 6, 2),  # dims not multiples of 8: the GEMV path over pairs
]


@pytest.mark.parametrize("t,h,i,e,k", MOE_CASES)
def test_moe_experts(ops, rng, t, h, i, e, k):
    ops.moe_cublas_min_tokens = 10**9  # the prefill path has tests of its own
    x = bf16_randn(rng, t, h)
    gate_up = round_bf16((rng.standard_normal((e, 2 * i, h)) / np.sqrt(h)).astype(np.float32))
    down = round_bf16((rng.standard_normal((e, h, i)) / np.sqrt(i)).astype(np.float32))
    # skewed expert popularity, so some experts get several chunks of tokens and some none
    pop = 1.0 / np.arange(1, e + 1) ** 1.5
    ids = np.stack([rng.choice(e, k, replace=False, p=pop / pop.sum()) for _ in range(t)])
    w = rng.random((t, k)).astype(np.float32)
    w /= w.sum(-1, keepdims=True)
    want = ref.moe_experts(x, w, ids, gate_up, down)
    gu_dev, down_dev = ops.linear_weight(gate_up, None), ops.linear_weight(down, None)
    got = ops.moe_experts(ops.weight(x), ops.to_device(w), ops.to_device(ids), gu_dev, down_dev)
    assert_bf16_close(ops.to_host(got), want)


# -- memory -------------------------------------------------------------------------------


def test_copy_block_between_device_and_host_pools(ops, rng):
    shape = (3, 2, 5, 4, 2, 8)  # [layers, 2, blocks, block_size, kv_heads, D]
    pool = ops.alloc_kv_cache(shape)
    assert pool.shape == shape and not ops.to_host(pool).any()
    data = bf16_randn(rng, *shape)
    pool.view(np.uint16)[...] = ops.weight(data).view(np.uint16)
    host = np.full((3, 2, 4, 4, 2, 8), np.nan, np.float32)  # the swap tier, float32
    ops.copy_block(host, 1, pool, 3)  # swap out
    np.testing.assert_array_equal(host[:, :, 1], data[:, :, 3])
    ops.copy_block(pool, 0, host, 1)  # swap in, to another block
    np.testing.assert_array_equal(ops.to_host(pool)[:, :, 0], data[:, :, 3])
    other = ops.alloc_kv_cache(shape)
    ops.copy_block(other, 4, pool, 2)  # device to device
    np.testing.assert_array_equal(ops.to_host(other)[:, :, 4], data[:, :, 2])
    assert not ops.to_host(other)[:, :, :4].any()
