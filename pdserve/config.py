"""Frozen configuration objects, built once from files or flags."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("Ernie4_5_MoeForCausalLM", "Ernie4_5_MoEForCausalLM")
SUPPORTED_MODEL_TYPES = ("ernie4_5_moe",)


class ConfigError(ValueError):
    """A config.json we cannot serve; the message names the field and the file."""


@dataclass(frozen=True)
class ModelConfig:
    """The ERNIE-4.5 MoE architecture, as read from a Hugging Face style config.json.

    Sizes are in elements (not bytes); layer indices are 0-based.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense MLP (layer 0 of ERNIE-4.5-21B-A3B)
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    moe_num_experts: int
    moe_k: int
    moe_intermediate_size: int
    moe_num_shared_experts: int
    moe_layer_start_index: int
    moe_layer_end_index: int  # inclusive, already resolved from -1
    moe_layer_interval: int
    moe_norm_min: float
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    num_nextn_predict_layers: int = 0
    model_type: str = "ernie4_5_moe"

    def is_moe_layer(self, layer: int) -> bool:
        """True when decoder layer `layer` has a sparse MoE block instead of a dense MLP."""
        return (
            (layer + 1) % self.moe_layer_interval == 0
            and self.moe_layer_start_index <= layer <= self.moe_layer_end_index
        )

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def shared_intermediate_size(self) -> int:
        return self.moe_intermediate_size * self.moe_num_shared_experts

    @classmethod
    def from_hf(cls, path: str | Path) -> ModelConfig:
        """Read `config.json` (or a model directory containing one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(
                f"{path}: no such file; a model directory needs config.json"
            ) from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> ModelConfig:
        r = _Reader(raw, source)
        archs = raw.get("architectures")
        model_type = raw.get("model_type")
        if archs is not None:
            if not isinstance(archs, list) or not archs:
                raise ConfigError(f"{source}: 'architectures' must be a non-empty list")
            if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
                raise ConfigError(
                    f"{source}: architecture {archs} is not served; "
                    f"pdserve serves {', '.join(SUPPORTED_ARCHITECTURES)}"
                )
        elif model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not served and no 'architectures' given; "
                f"pdserve serves model_type {SUPPORTED_MODEL_TYPES[0]!r}"
            )
        if raw.get("use_bias"):
            raise ConfigError(f"{source}: 'use_bias': true is not supported (ERNIE-4.5 has none)")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: 'hidden_act' {act!r} is not supported (only 'silu')")

        hidden = r.int("hidden_size")
        layers = r.int("num_hidden_layers")
        heads = r.int("num_attention_heads")
        kv_heads = r.int("num_key_value_heads", heads)
        head_dim = r.int("head_dim", hidden // heads if heads else 0)
        if heads % kv_heads:
            raise ConfigError(
                f"{source}: 'num_attention_heads' ({heads}) must be a multiple of "
                f"'num_key_value_heads' ({kv_heads})"
            )
        if head_dim % 2:
            raise ConfigError(f"{source}: 'head_dim' ({head_dim}) must be even for RoPE")
        experts = r.int("moe_num_experts")
        moe_k = r.int("moe_k")
        if moe_k > experts:
            raise ConfigError(f"{source}: 'moe_k' ({moe_k}) must be in 1..moe_num_experts")
        end = r.int("moe_layer_end_index", -1, minimum=-1)
        start = r.int("moe_layer_start_index", 1, minimum=0)
        end = layers - 1 if end == -1 else end
        if end >= layers:
            raise ConfigError(
                f"{source}: 'moe_layer_end_index' ({end}) must be below "
                f"num_hidden_layers ({layers})"
            )
        eos = raw.get("eos_token_id", 2)
        if isinstance(eos, list):
            eos = eos[0] if eos else 2
        return cls(
            vocab_size=r.int("vocab_size"),
            hidden_size=hidden,
            intermediate_size=r.int("intermediate_size"),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=r.float("rms_norm_eps", 1e-5),
            rope_theta=_rope_theta(raw, source),
            max_position_embeddings=r.int("max_position_embeddings", 131072),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
            moe_num_experts=experts,
            moe_k=moe_k,
            moe_intermediate_size=r.int("moe_intermediate_size"),
            # transformers' default, so both read one config.json the same way
            moe_num_shared_experts=r.int("moe_num_shared_experts", 2, minimum=0),
            moe_layer_start_index=start,
            moe_layer_end_index=end,
            moe_layer_interval=r.int("moe_layer_interval", 1),
            moe_norm_min=r.float("moe_norm_min", 1e-12),
            bos_token_id=int(raw.get("bos_token_id", 1) or 1),
            eos_token_id=int(eos),
            pad_token_id=int(raw.get("pad_token_id", 0) or 0),
            num_nextn_predict_layers=r.int("num_nextn_predict_layers", 0, minimum=0),
            model_type=str(model_type or "ernie4_5_moe"),
        )


def _rope_theta(raw: dict[str, Any], source: str) -> float:
    params = raw.get("rope_parameters") or raw.get("rope_scaling")
    if isinstance(params, dict):
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"{source}: rope_type {rope_type!r} is not supported (only default)")
        if "rope_theta" in params:
            return _Reader(params, source + " rope_parameters").float("rope_theta")
    return _Reader(raw, source).float("rope_theta", 500000.0)


class _Reader:
    """Typed access to config fields with errors that name the field."""

    def __init__(self, raw: dict[str, Any], source: str) -> None:
        self.raw, self.source = raw, source

    def _get(self, key: str, default: Any) -> Any:
        if key in self.raw and self.raw[key] is not None:
            return self.raw[key]
        if default is None:
            raise ConfigError(f"{self.source}: missing required field {key!r}")
        return default

    def int(self, key: str, default: int | None = None, minimum: int = 1) -> int:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(
                f"{self.source}: field {key!r} must be an integer >= {minimum}, got {value!r}"
            )
        return value

    def float(self, key: str, default: float | None = None) -> float:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(
                f"{self.source}: field {key!r} must be a positive number, got {value!r}"
            )
        return float(value)
