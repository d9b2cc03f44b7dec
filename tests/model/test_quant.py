"""Weight-only quantization at load (wint8, wint4): storage, error bounds, and the model."""

from __future__ import annotations

import numpy as np
import pytest

from pdserve.backends.numpy_ops import NumpyOps
from pdserve.engine.model_runner import ModelRunner, SeqChunk
from pdserve.model.ernie45_moe import load_model
from pdserve.model.quant import quantize  # noqa: I001
from tests.conftest import make_checkpoint


@pytest.mark.parametrize(("method", "qmax", "ratio"), [("wint8", 127, 4), ("wint4", 7, 8)])
def test_quantize_error_is_half_a_step_and_storage_shrinks(method, qmax, ratio):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 40, 257)).astype(np.float32)  # odd in_features: wint4 pads
    q = quantize(w, method)
    deq = q.dequantize()
    assert deq.shape == w.shape and q.shape == w.shape
    step = np.abs(w).max(axis=-1, keepdims=True) / qmax  # per output channel
    assert np.all(np.abs(deq - w) <= step / 2 + 1e-6)
    assert q.nbytes < w.nbytes / ratio * 1.1  # int8, or two 4-bit values a byte, plus scales
    np.testing.assert_array_equal(q[1].dequantize(), deq[1])  # one expert of a stack


def test_fp8_codes_round_exactly_like_torch_float8_e4m3fn():
    import torch

    from pdserve.model.quant import _E4M3, _e4m3_encode

    rng = np.random.default_rng(1)
    # normal range, subnormals, exact ties, the largest value and zeros of both signs
    x = np.concatenate(
        [
            rng.standard_normal(50_000) * 100,
            rng.standard_normal(50_000) * 0.01,
            np.arange(-64, 64) / 64.0 * 2.0**-6,
            [448.0, -448.0, 0.0, -0.0],
        ]
    )
    x = np.clip(x, -448, 448).astype(np.float32)  # fmt: skip
    ref = torch.tensor(x).to(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(_E4M3[_e4m3_encode(x)], ref)


def test_block_wise_fp8_scales_each_128_block():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((2, 200, 300)).astype(np.float32)
    w[0, :128, :128] *= 1000  # one loud block must not cost the others precision
    q = quantize(w, "block_wise_fp8")
    assert q.scale.shape == (2, 2, 3) and q.q.dtype == np.uint8 and q.shape == w.shape
    deq = q.dequantize()
    # every value within half a unit of its block's fp8 grid: 2^-4 relative (3 mantissa bits),
    # or half a subnormal step of its block's scale
    full = q.scale.repeat(128, axis=-2).repeat(128, axis=-1)[..., :200, :300]
    assert np.all(np.abs(deq - w) <= np.abs(w) * 2**-4 + full * 2**-10 + 1e-9)
    # the quiet blocks beside the loud one keep their own precision
    quiet = np.abs(deq[0, 128:, 128:] - w[0, 128:, 128:]) / np.abs(w[0, 128:, 128:]).max()
    assert quiet.max() < 2**-4


def test_unknown_method_names_the_flag():
    with pytest.raises(ValueError, match="--quantization 'int3'"):
        quantize(np.ones((2, 2), np.float32), "int3")


def test_quantized_models_approximate_the_float_model(checkpoints):
    path = make_checkpoint(checkpoints, "gqa_moe", seed=5)
    ops = NumpyOps()
    prompt = list(range(3, 60))

    def logits(q):
        runner = ModelRunner(load_model(path, ops, False, q), ops, 8, 16)
        return runner.execute([SeqChunk(prompt, 0, len(prompt), [0, 1, 2, 3], all_logits=True)])

    ref, w8, w4, f8 = logits(None), logits("wint8"), logits("wint4"), logits("block_wise_fp8")
    err8 = np.median(np.abs(w8 - ref)) / np.abs(ref).mean()
    err4 = np.median(np.abs(w4 - ref)) / np.abs(ref).mean()
    assert 0 < err8 < 0.03 and err8 < err4 < 0.5
    errf8 = np.median(np.abs(f8 - ref)) / np.abs(ref).mean()
    assert 0 < errf8 < err4  # 3 mantissa bits per value beat 4-bit integers
    agree = [(x.argmax(-1) == ref.argmax(-1)).mean() for x in (w8, w4)]
    assert agree[0] >= 0.9 and agree[1] >= 0.7
