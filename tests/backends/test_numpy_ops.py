"""NumPy ops checked against direct formulations on crafted inputs."""

from __future__ import annotations

import numpy as np

from pdserve.backends.numpy_ops import NumpyOps

ops = NumpyOps()


def test_correction_bias_changes_selection_but_not_weights():
    # router logits chosen so p = softmax = [0.5, 0.3, 0.2]
    p = np.array([0.5, 0.3, 0.2], np.float32)
    router = np.diag(np.log(p)).astype(np.float32)  # x = ones -> logits = log p
    x = np.ones((1, 3), np.float32)
    w, ids = ops.moe_route(x, router, np.zeros(3, np.float32), top_k=2, norm_min=1e-12)
    assert ids.tolist() == [[0, 1]]
    np.testing.assert_allclose(w, [[0.5 / 0.8, 0.3 / 0.8]], rtol=1e-6)
    # a bias of +0.2 on expert 2 lifts it over expert 1; its weight is still its unbiased p
    w, ids = ops.moe_route(x, router, np.array([0, 0, 0.2], np.float32), 2, 1e-12)
    assert ids.tolist() == [[0, 2]]
    np.testing.assert_allclose(w, [[0.5 / 0.7, 0.2 / 0.7]], rtol=1e-6)


def test_norm_min_bounds_the_renormalization():
    router = np.zeros((4, 2), np.float32)
    w, _ = ops.moe_route(np.ones((1, 2), np.float32), router, np.zeros(4, np.float32), 1, 0.5)
    np.testing.assert_allclose(w, [[0.25 / 0.5]])  # sum 0.25 < norm_min 0.5


def test_rope_rotates_interleaved_pairs():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, 8)).astype(np.float32)  # [T, heads, D]
    pos = np.array([0, 1, 1000])
    got = ops.rope(x, pos, theta=10000.0)
    inv_freq = 1.0 / 10000.0 ** (np.arange(0, 8, 2) / 8)
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * pos[:, None, None] * inv_freq)
    np.testing.assert_allclose(got[..., 0::2], z.real, atol=1e-4)
    np.testing.assert_allclose(got[..., 1::2], z.imag, atol=1e-4)
    np.testing.assert_array_equal(got[0], x[0])  # position 0 is the identity


def test_moe_experts_weights_each_selected_expert():
    rng = np.random.default_rng(1)
    e, h, i = 4, 6, 5
    gate_up = rng.standard_normal((e, 2 * i, h)).astype(np.float32)
    down = rng.standard_normal((e, h, i)).astype(np.float32)
    x = rng.standard_normal((3, h)).astype(np.float32)
    ids = np.array([[0, 3], [3, 1], [2, 2]])
    w = rng.random((3, 2)).astype(np.float32)
    got = ops.moe_experts(x, w, ids, gate_up, down)
    for t in range(3):
        ref = sum(w[t, k] * ops.linear(ops.silu_mul(ops.linear(x[t : t + 1], gate_up[ids[t, k]])),
                                       down[ids[t, k]])[0] for k in range(2))  # fmt: skip
        np.testing.assert_allclose(got[t], ref, rtol=1e-5, atol=1e-5)
