"""Shared factories: random ERNIE-4.5 MoE checkpoints and runners over them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from pdserve.backends.numpy_ops import NumpyOps
from pdserve.config import ModelConfig
from pdserve.engine.model_runner import ModelRunner, SeqChunk
from pdserve.model.ernie45_moe import load_model
from pdserve.model.tiny import random_state_dict, to_paddle_layout, write_checkpoint

# Small configs exercising what the full model has: GQA, a dense first layer, several MoE layers
# with shared experts, a correction bias, top-k > 1, and (in the second) MoE every other layer
# and an untied lm_head.
CONFIGS = {
    "gqa_moe": {
        "vocab_size": 300,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "moe_num_experts": 8,
        "moe_k": 2,
        "moe_intermediate_size": 32,
        "moe_num_shared_experts": 1,
        "moe_layer_start_index": 1,
        "moe_layer_interval": 1,
        "tie_word_embeddings": True,
    },
    "interval_untied": {
        "vocab_size": 200,
        "hidden_size": 48,
        "intermediate_size": 80,
        "num_hidden_layers": 5,
        "num_attention_heads": 6,
        "num_key_value_heads": 1,
        "head_dim": 8,
        "moe_num_experts": 12,
        "moe_k": 4,
        "moe_intermediate_size": 24,
        "moe_num_shared_experts": 2,
        "moe_layer_start_index": 1,
        "moe_layer_end_index": 4,
        "moe_layer_interval": 2,
        "tie_word_embeddings": False,
    },
}

BASE = {
    "architectures": ["Ernie4_5_MoeForCausalLM"],
    "model_type": "ernie4_5_moe",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "use_bias": False,
    "hidden_act": "silu",
    "moe_norm_min": 1e-12,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "torch_dtype": "float32",
}


def assert_close(ours: np.ndarray, ref: np.ndarray, rtol: float = 1e-4) -> None:
    """Within `rtol` relative to the logits' scale (fp32 vs fp32, different summation order)."""
    err = np.abs(ours - ref).max()
    scale = np.abs(ref).max()
    assert err <= rtol * scale, f"max abs diff {err:.3g} vs logit scale {scale:.3g}"


def full_config(name: str) -> dict:
    return {**BASE, **CONFIGS[name]}


def make_checkpoint(root: Path, name: str, layout: str = "pt", seed: int = 0) -> Path:
    """A model directory with random weights of config `name`, in the PT or Paddle layout."""
    cfg = full_config(name)
    sd = random_state_dict(ModelConfig.from_dict(cfg), seed)
    if layout == "paddle":
        sd = to_paddle_layout(sd)
    path = root / f"{name}-{layout}-{seed}"
    write_checkpoint(path, cfg, sd, tokenizer=False)
    return path


def make_runner(model_dir: Path, num_blocks: int = 64, block_size: int = 16) -> ModelRunner:
    ops = NumpyOps()
    return ModelRunner(load_model(model_dir, ops, progress=False), ops, num_blocks, block_size)


def prefill_logits(runner: ModelRunner, prompts: list[list[int]], tables: list[list[int]]):
    """Logits of every prompt token, all prompts in one batched pass."""
    chunks = [SeqChunk(p, 0, len(p), t, all_logits=True) for p, t in zip(prompts, tables)]
    logits = runner.execute(chunks)
    bounds = np.cumsum([0] + [len(p) for p in prompts])
    return [logits[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ckpt")


@pytest.fixture(autouse=True, scope="session")
def _tiny_cache(tmp_path_factory):
    """Keep the built-in model and the ipc sockets of this test run out of the user's dirs (a
    node killed with SIGKILL cannot remove its sockets)."""
    os.environ.setdefault("PDSERVE_CACHE_DIR", str(tmp_path_factory.mktemp("pdserve-cache")))
    os.environ.setdefault("PDSERVE_IPC_DIR", str(tmp_path_factory.mktemp("ipc")))
