"""A mid-size random ERNIE-4.5 MoE on the GPU against transformers' Ernie4_5_MoeForCausalLM
in bf16 on the same GPU, both scored against transformers in float32 (the truth): our bf16
logits must be about as close to it as transformers' own bf16 logits are."""

from __future__ import annotations

import numpy as np
import pytest

from pdserve.backends import gpu_unavailable_reason
from pdserve.config import ModelConfig
from pdserve.engine.model_runner import ModelRunner, SeqChunk
from pdserve.model.ernie45_moe import load_model
from pdserve.model.tiny import random_state_dict, write_checkpoint
from tests.conftest import BASE

REASON = gpu_unavailable_reason()
if REASON is not None:
    pytest.skip(f"GPU tests need CuPy and a CUDA GPU: {REASON}", allow_module_level=True)
torch = pytest.importorskip("torch", reason="transformers' model is the oracle")
transformers = pytest.importorskip("transformers")
if not torch.cuda.is_available():
    pytest.skip("torch sees no CUDA GPU", allow_module_level=True)

from pdserve.backends.cupy_ops import CupyOps  # noqa: E402

pytestmark = pytest.mark.gpu
MID = {
    **BASE,
    "vocab_size": 8192, "hidden_size": 1024, "intermediate_size": 3072,
    "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 128,
    "moe_num_experts": 16, "moe_k": 4, "moe_intermediate_size": 512,
    "moe_num_shared_experts": 2, "moe_layer_start_index": 1, "moe_layer_interval": 1,
    "tie_word_embeddings": True, "rope_theta": 500000.0,
}  # fmt: skip
LENGTHS = (1, 37, 130, 300)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("mid") / "ernie-mid"
    write_checkpoint(path, MID, random_state_dict(ModelConfig.from_dict(MID), 11), tokenizer=False)
    return path


def hf_logits(path, dtype, prompts: list[list[int]]) -> list[np.ndarray]:
    model = transformers.Ernie4_5_MoeForCausalLM.from_pretrained(path, dtype=dtype).cuda().eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            logits = model(torch.tensor([p], device="cuda"), use_cache=False).logits[0]
            out.append(logits.float().cpu().numpy())
    del model
    torch.cuda.empty_cache()
    return out


def test_bf16_logits_as_close_to_float32_as_transformers_bf16(checkpoint):
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, MID["vocab_size"], n).tolist() for n in LENGTHS]
    truth = hf_logits(checkpoint, torch.float32, prompts)
    theirs = hf_logits(checkpoint, torch.bfloat16, prompts)
    ops = CupyOps()
    runner = ModelRunner(load_model(checkpoint, ops, progress=False), ops, 16, 64)
    tables, nxt = [], 0
    for p in prompts:
        n = -(-len(p) // 64)
        tables.append(list(range(nxt, nxt + n)))
        nxt += n
    logits = runner.execute([SeqChunk(p, 0, len(p), t, all_logits=True)
                             for p, t in zip(prompts, tables)])  # fmt: skip
    bounds = np.cumsum([0, *LENGTHS])
    ours = [logits[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    for o, h, t in zip(ours, theirs, truth):
        scale = np.abs(t).max()
        err_ours = np.median(np.abs(o - t).max(axis=-1)) / scale
        err_hf = np.median(np.abs(h - t).max(axis=-1)) / scale
        print(
            f"{len(t)} tokens: median row error vs fp32: ours {err_ours:.4f}, hf bf16 {err_hf:.4f}"
        )
        assert err_ours <= 1e-2, f"median row error {err_ours:.4f} of the logit scale"
        assert err_ours <= 2 * err_hf + 2e-3, (err_ours, err_hf)
        agree = np.mean(o.argmax(-1) == t.argmax(-1))
        assert agree >= 0.9, f"argmax agrees with fp32 on {agree:.0%} of rows"
