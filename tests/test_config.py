"""ModelConfig.from_hf: every ERNIE-4.5 field, and errors that name the field."""

from __future__ import annotations

import json

import pytest

from pdserve.config import ConfigError, ModelConfig

# ERNIE-4.5-21B-A3B-PT's config.json, as published
ERNIE_21B = {
    "architectures": ["Ernie4_5_MoeForCausalLM"],
    "model_type": "ernie4_5_moe",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "hidden_act": "silu",
    "hidden_size": 2560,
    "intermediate_size": 12288,
    "max_position_embeddings": 131072,
    "num_attention_heads": 20,
    "num_key_value_heads": 4,
    "num_hidden_layers": 28,
    "rms_norm_eps": 1e-05,
    "vocab_size": 103424,
    "rope_theta": 500000,
    "use_bias": False,
    "tie_word_embeddings": True,
    "moe_num_experts": 64,
    "moe_num_shared_experts": 2,
    "moe_layer_start_index": 1,
    "moe_intermediate_size": 1536,
    "moe_k": 6,
    "moe_layer_interval": 1,
    "torch_dtype": "bfloat16",
}


def test_ernie_21b_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(ERNIE_21B))
    c = ModelConfig.from_hf(tmp_path)
    assert (c.head_dim, c.q_size, c.kv_size) == (128, 2560, 512)
    assert c.moe_layer_end_index == 27 and c.shared_intermediate_size == 3072
    assert not c.is_moe_layer(0) and all(c.is_moe_layer(i) for i in range(1, 28))
    assert c.rope_theta == 500000.0 and c.moe_norm_min == 1e-12 and c.tie_word_embeddings
    with pytest.raises(AttributeError):
        c.hidden_size = 1  # frozen


def test_interval_and_end_index_select_moe_layers():
    c = ModelConfig.from_dict(
        {**ERNIE_21B, "num_hidden_layers": 8, "moe_layer_interval": 2, "moe_layer_end_index": 5}
    )
    assert [i for i in range(8) if c.is_moe_layer(i)] == [1, 3, 5]


def test_rope_parameters_form():
    raw = {**ERNIE_21B, "rope_parameters": {"rope_type": "default", "rope_theta": 1234.0}}
    del raw["rope_theta"]
    assert ModelConfig.from_dict(raw).rope_theta == 1234.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"architectures": ["LlamaForCausalLM"]}, r"architecture \['LlamaForCausalLM'\] is not"),
        ({"hidden_size": None}, "missing required field 'hidden_size'"),
        ({"moe_k": "six"}, "'moe_k' must be an integer"),
        ({"moe_k": 65}, "'moe_k' .* must be in 1..moe_num_experts"),
        ({"num_key_value_heads": 3}, "multiple of 'num_key_value_heads'"),
        ({"rms_norm_eps": -1}, "'rms_norm_eps' must be a positive number"),
        ({"use_bias": True}, "'use_bias'"),
        ({"hidden_act": "gelu"}, "'hidden_act'"),
        ({"moe_layer_end_index": 40}, "'moe_layer_end_index'"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4}}, "rope_type 'yarn'"),
    ],
)
def test_invalid_fields_are_named(tmp_path, change, message):
    raw = {**ERNIE_21B, **change}
    raw = {k: v for k, v in raw.items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf(tmp_path)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="needs config.json"):
        ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_hf(tmp_path)
