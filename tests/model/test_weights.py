"""Checkpoint loading: shards, bf16, and errors that name the tensor and the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from safetensors.torch import save_file as save_torch

from pdserve.config import ModelConfig
from pdserve.model.safetensors_io import Checkpoint, CheckpointError
from pdserve.model.tiny import random_state_dict, write_checkpoint
from pdserve.model.weights import load_weights
from tests.conftest import full_config, make_checkpoint, make_runner, prefill_logits

CFG = full_config("gqa_moe")


def write(path: Path, sd: dict[str, np.ndarray]) -> Path:
    write_checkpoint(path, CFG, sd, tokenizer=False)
    return path


def state() -> dict[str, np.ndarray]:
    return random_state_dict(ModelConfig.from_dict(CFG), seed=3)


def load(path: Path):
    return load_weights(path, ModelConfig.from_hf(path), progress=False)


def test_truncated_file_names_tensor_and_file(tmp_path):
    path = write(tmp_path / "m", state())
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: tensor '.*' needs bytes .* "
        r"truncated",
    ):
        load(path)


def test_truncated_header_is_reported(tmp_path):
    path = write(tmp_path / "m", state())
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated"):
        load(path)


def test_missing_tensor_is_named(tmp_path):
    sd = state()
    del sd["model.layers.2.mlp.experts.5.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"'model\.layers\.2\.mlp\.experts\.5\.up_proj"):
        load(write(tmp_path / "m", sd))


def test_wrong_shape_names_tensor_file_and_shapes(tmp_path):
    sd = state()
    sd["model.layers.1.self_attn.o_proj.weight"] = np.zeros((64, 32), np.float32)
    with pytest.raises(
        CheckpointError,
        match=r"o_proj\.weight' in .*model\.safetensors has "
        r"shape \[64, 32\], expected \[64, 64\]",
    ):
        load(write(tmp_path / "m", sd))


def test_unexpected_tensor_is_named(tmp_path):
    sd = state()
    sd["model.layers.0.self_attn.rotary.inv_freq"] = np.zeros(8, np.float32)
    with pytest.raises(CheckpointError, match=r"unexpected .*rotary\.inv_freq' in model"):
        load(write(tmp_path / "m", sd))


def test_mtp_tensors_are_recognised_and_skipped(tmp_path):
    sd = state()
    sd["model.mtp_linear_proj.0.weight"] = np.zeros((64, 128), np.float32)
    assert len(load(write(tmp_path / "m", sd)).layers) == 4


def test_sharded_checkpoint_with_index_loads_the_same_model(tmp_path, checkpoints):
    single = make_checkpoint(checkpoints, "gqa_moe", seed=3)
    sd = state()
    names = sorted(sd)
    path = tmp_path / "sharded"
    write_checkpoint(path, CFG, {}, tokenizer=False)
    (path / "model.safetensors").unlink()
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: sd[n] for n in part}, str(path / fname))
        weight_map.update(dict.fromkeys(part, fname))
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    prompts, tables = [[5, 6, 7, 8, 9]], [[0]]
    a = prefill_logits(make_runner(single), prompts, tables)[0]
    b = prefill_logits(make_runner(path), prompts, tables)[0]
    np.testing.assert_array_equal(a, b)
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors which does not"):
        load(path)


def test_bf16_tensors_widen_exactly(tmp_path):
    t = torch.randn(7, 5).bfloat16()
    save_torch({"w": t}, str(tmp_path / "model.safetensors"))
    got = Checkpoint(tmp_path).read_float32("w")
    np.testing.assert_array_equal(got, t.float().numpy())
