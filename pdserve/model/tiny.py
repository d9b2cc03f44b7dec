"""The built-in `tiny` model and random ERNIE-4.5 MoE checkpoints.

`tiny` is the ERNIE-4.5 MoE architecture at toy size with weights drawn from a fixed seed. It is
written on first use as a real model directory (config.json, model.safetensors, tokenizer files)
and then loaded through the same path as a real checkpoint. The same writer makes the random
checkpoints the tests compare against transformers, in the PT naming or the Paddle layout.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from pdserve.config import ModelConfig
from pdserve.tokenizer import write_byte_tokenizer_files

TINY_NAME = "tiny"
TINY_VERSION = 2
TINY_SEED = 20251125

TINY_CONFIG: dict[str, Any] = {
    "architectures": ["Ernie4_5_MoeForCausalLM"],
    "model_type": "ernie4_5_moe",
    "vocab_size": 264,  # the byte-level tokenizer: 8 specials + 256 bytes
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 131072,  # as ERNIE-4.5-21B-A3B: its guide sets 131072
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "use_bias": False,
    "hidden_act": "silu",
    "moe_num_experts": 8,
    "moe_k": 2,
    "moe_intermediate_size": 32,
    "moe_num_shared_experts": 1,
    "moe_layer_start_index": 1,
    "moe_layer_end_index": 3,
    "moe_layer_interval": 1,
    "moe_norm_min": 1e-12,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "torch_dtype": "float32",
}


def cache_dir() -> Path:
    """Where built-in models are written: $PDSERVE_CACHE_DIR, else ~/.cache/pdserve."""
    env = os.environ.get("PDSERVE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "pdserve"


def random_state_dict(config: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """Float32 weights in the PT naming, scaled so activations stay O(1) through the layers."""
    rng = np.random.default_rng(seed)
    c, h = config, config.hidden_size

    def linear(out_dim: int, in_dim: int) -> np.ndarray:
        return (rng.standard_normal((out_dim, in_dim)) / np.sqrt(in_dim)).astype(np.float32)

    def norm() -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(h)).astype(np.float32)

    def mlp(prefix: str, inter: int) -> dict[str, np.ndarray]:
        return {
            f"{prefix}gate_proj.weight": linear(inter, h),
            f"{prefix}up_proj.weight": linear(inter, h),
            f"{prefix}down_proj.weight": linear(h, inter),
        }

    sd = {"model.embed_tokens.weight": rng.standard_normal((c.vocab_size, h)).astype(np.float32)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        sd[f"{p}input_layernorm.weight"] = norm()
        sd[f"{p}post_attention_layernorm.weight"] = norm()
        for name, rows in (("q", c.q_size), ("k", c.kv_size), ("v", c.kv_size)):
            sd[f"{p}self_attn.{name}_proj.weight"] = linear(rows, h)
        sd[f"{p}self_attn.o_proj.weight"] = linear(h, c.q_size)
        if not c.is_moe_layer(i):
            sd.update(mlp(f"{p}mlp.", c.intermediate_size))
            continue
        # a decisive router and a correction bias large enough to change some selections
        sd[f"{p}mlp.gate.weight"] = 4.0 * linear(c.moe_num_experts, h)
        bias = 0.05 * rng.standard_normal((1, c.moe_num_experts))
        sd[f"{p}mlp.moe_statics.e_score_correction_bias"] = bias.astype(np.float32)
        for e in range(c.moe_num_experts):
            sd.update(mlp(f"{p}mlp.experts.{e}.", c.moe_intermediate_size))
        if c.moe_num_shared_experts:
            sd.update(mlp(f"{p}mlp.shared_experts.", c.shared_intermediate_size))
    sd["model.norm.weight"] = norm()
    if not c.tie_word_embeddings:
        sd["lm_head.weight"] = linear(c.vocab_size, h)
    return sd


def to_paddle_layout(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same weights as a Paddle checkpoint: `ernie.` prefix, [in, out], fused qkv/up_gate."""
    out: dict[str, np.ndarray] = {}
    for name, w in sd.items():
        if name.endswith(("k_proj.weight", "v_proj.weight", "up_proj.weight")):
            continue  # folded into the fused tensor below
        new = name.replace("model.", "ernie.", 1)
        if name.endswith("q_proj.weight"):
            base = name[: -len("q_proj.weight")]
            w = np.concatenate([sd[base + f"{x}_proj.weight"] for x in "qkv"])
            new = new.replace("q_proj", "qkv_proj")
        elif name.endswith("gate_proj.weight"):
            base = name[: -len("gate_proj.weight")]
            w = np.concatenate([w, sd[base + "up_proj.weight"]])
            new = new.replace("gate_proj", "up_gate_proj")
        if w.ndim == 2 and "proj" in name or name.endswith("mlp.gate.weight"):
            w = w.T
        if name == "lm_head.weight":
            w, new = w.T, name
        out[new] = np.ascontiguousarray(w)
    return out


def write_checkpoint(
    model_dir: Path, config: dict[str, Any], sd: dict[str, np.ndarray], tokenizer: bool = True
) -> None:
    """A model directory as transformers reads it: config.json, model.safetensors, tokenizer."""
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    gen = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    (model_dir / "generation_config.json").write_text(json.dumps(gen, indent=2))
    save_file(sd, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer:
        write_byte_tokenizer_files(model_dir)


def tiny_state_dict() -> dict[str, np.ndarray]:
    config = ModelConfig.from_dict(TINY_CONFIG)
    sd = random_state_dict(config, TINY_SEED)
    # Random tied embeddings make a model echo its input token. Damping the embedding (printable
    # bytes least) and strengthening the layers' outputs gives babble that at least reads as text.
    scale = np.full(config.vocab_size, 0.1, dtype=np.float32)
    printable = np.frombuffer(bytes(range(32, 127)), dtype=np.uint8).astype(int) + 8
    letters = np.frombuffer(b" abcdefghijklmnopqrstuvwxyz", dtype=np.uint8).astype(int) + 8
    scale[printable] = 0.3
    scale[letters] = 0.45
    sd["model.embed_tokens.weight"] *= scale[:, None]
    for name in sd:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            sd[name] *= 3.0
    return sd


def ensure_tiny_model() -> Path:
    """The tiny model's directory, written on first use (safe when several processes race)."""
    target = cache_dir() / f"{TINY_NAME}-v{TINY_VERSION}"
    if (target / "model.safetensors").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        write_checkpoint(tmp, TINY_CONFIG, tiny_state_dict())
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(model: str) -> Path:
    """`tiny` names the built-in model; anything else is a model directory."""
    if model == TINY_NAME:
        return ensure_tiny_model()
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ValueError(
            f"--model {model!r}: not a directory; give a model directory (config.json, "
            f"*.safetensors, tokenizer files) or 'tiny'"
        )
    return path
