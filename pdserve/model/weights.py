"""Loading ERNIE-4.5 MoE weights from safetensors, in the PT naming or the Paddle layout.

PT naming (Hugging Face `*-PT` checkpoints): `model.` prefix, linears stored [out, in], separate
q/k/v and gate/up. Paddle layout (`*-Paddle` checkpoints): `ernie.` prefix, linears stored
[in, out], q/k/v fused as `qkv_proj` (q | k | v) and gate/up fused as `up_gate_proj` (first half is
the SiLU input). Either layout may use either fusion. Whatever is loaded ends in one form: linears
[out, in], q/k/v and gate/up fused, experts stacked per layer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pdserve.config import ModelConfig
from pdserve.model.safetensors_io import Checkpoint, CheckpointError

logger = logging.getLogger(__name__)

# Tensors of the multi-token-prediction head; read by speculative decoding, not by the base model.
_MTP_MARKER = "mtp_"


@dataclass
class MLPWeights:
    gate_up: Any  # [2 * I, H], gate rows first
    down: Any  # [H, I]


@dataclass
class MoEWeights:
    router: Any  # [E, H] fp32
    correction_bias: Any  # [E] fp32, added to router probabilities for selection only
    gate_up: Any  # [E, 2 * I, H]
    down: Any  # [E, H, I]
    shared: MLPWeights | None


@dataclass
class LayerWeights:
    input_norm: Any  # [H]
    post_attention_norm: Any  # [H]
    qkv: Any  # [q_size + 2 * kv_size, H]
    o: Any  # [H, q_size]
    mlp: MLPWeights | MoEWeights


@dataclass
class ModelWeights:
    embed: Any  # [V, H]
    layers: list[LayerWeights]
    norm: Any  # [H]
    lm_head: Any  # [V, H]; the embedding itself when tied


class _Reader:
    """Takes tensors out of a checkpoint by name, checking shapes and remembering what was used."""

    def __init__(self, ckpt: Checkpoint, model_dir: Path, progress: bool) -> None:
        self.ckpt = ckpt
        self.model_dir = model_dir
        self.paddle = any(n.startswith("ernie.") for n in ckpt)
        self.used: set[str] = set()
        self.bar = tqdm(
            total=len(ckpt), desc="Loading weights", unit="tensor", disable=not progress
        )

    def take(self, name: str, shape: tuple[int, ...], linear: bool = False) -> np.ndarray:
        """Tensor `name` as float32 of `shape` ([out, in] for linears, whatever the layout)."""
        if name not in self.ckpt:
            raise CheckpointError(f"missing tensor {name!r} in {self._files()}")
        arr = self.ckpt.read_float32(name)
        transposed = linear and self.paddle
        stored = (*shape[:-2], shape[-1], shape[-2]) if transposed else shape
        if arr.size == int(np.prod(shape)) and arr.shape != stored and arr.shape[0] == 1:
            arr = arr.reshape(stored)  # e.g. correction bias stored [1, E]
        if arr.shape != stored:
            layout = " (Paddle layout stores linears [in, out])" if transposed else ""
            raise CheckpointError(
                f"tensor {name!r} in {self.ckpt.entry(name).file} has shape {list(arr.shape)}, "
                f"expected {list(stored)}{layout}"
            )
        if transposed:
            arr = np.ascontiguousarray(np.swapaxes(arr, -1, -2))
        self.used.add(name)
        self.bar.update(1)
        return arr

    def take_fused(self, fused: list[str], parts: list[tuple[str, int]], in_dim: int) -> np.ndarray:
        """Rows of several linears stacked: from a fused tensor if present, else from the parts."""
        rows = sum(n for _, n in parts)
        for name in fused:
            if name in self.ckpt:
                return self.take(name, (rows, in_dim), linear=True)
        if all(name in self.ckpt for name, _ in parts) or not fused:
            return np.concatenate([self.take(n, (r, in_dim), linear=True) for n, r in parts])
        missing = next(name for name, _ in parts if name not in self.ckpt)
        raise CheckpointError(
            f"missing tensor {missing!r} (or fused {fused[0]!r}) in {self._files()}"
        )

    def take_any(self, names: list[str], shape: tuple[int, ...]) -> np.ndarray:
        for name in names:
            if name in self.ckpt:
                return self.take(name, shape)
        raise CheckpointError(f"missing tensor {names[0]!r} in {self._files()}")

    def _files(self) -> str:
        return f"{self.model_dir} ({', '.join(self.ckpt.files)})"

    def check_all_used(self) -> None:
        self.bar.close()
        extra = [n for n in self.ckpt if n not in self.used]
        mtp = [n for n in extra if _MTP_MARKER in n]
        if mtp:
            logger.info("skipped %d MTP tensors (used only by speculative decoding)", len(mtp))
        unknown = [n for n in extra if _MTP_MARKER not in n]
        if unknown:
            shown = ", ".join(f"{n!r} in {self.ckpt.entry(n).file.name}" for n in unknown[:5])
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise CheckpointError(f"unexpected tensors not recognised by pdserve: {shown}{more}")


def load_weights(model_dir: str | Path, config: ModelConfig, progress: bool = True) -> ModelWeights:
    """Read every tensor of the checkpoint in `model_dir` as float32, in pdserve's layout."""
    model_dir = Path(model_dir)
    r = _Reader(Checkpoint(model_dir), model_dir, progress)
    c = config
    p = "ernie." if r.paddle else "model."
    h = c.hidden_size
    embed = r.take(f"{p}embed_tokens.weight", (c.vocab_size, h))
    layers = [_load_layer(r, c, f"{p}layers.{i}.", i) for i in range(c.num_hidden_layers)]
    norm = r.take(f"{p}norm.weight", (h,))
    if c.tie_word_embeddings:
        lm_head = embed
        if "lm_head.weight" in r.ckpt:  # some exports keep the tied copy; tying wins, as in HF
            r.used.add("lm_head.weight")
            r.bar.update(1)
    else:
        lm_head = r.take("lm_head.weight", (c.vocab_size, h), linear=True)
    r.check_all_used()
    return ModelWeights(embed=embed, layers=layers, norm=norm, lm_head=lm_head)


def _load_layer(r: _Reader, c: ModelConfig, p: str, index: int) -> LayerWeights:
    h = c.hidden_size
    a = f"{p}self_attn."
    qkv = r.take_fused(
        [f"{a}qkv_proj.weight"],
        [
            (f"{a}q_proj.weight", c.q_size),
            (f"{a}k_proj.weight", c.kv_size),
            (f"{a}v_proj.weight", c.kv_size),
        ],
        h,
    )
    o = r.take(f"{a}o_proj.weight", (h, c.q_size), linear=True)
    m = f"{p}mlp."
    moe = c.is_moe_layer(index)
    mlp = _load_moe(r, c, m) if moe else _load_mlp(r, m, h, c.intermediate_size)
    return LayerWeights(
        input_norm=r.take(f"{p}input_layernorm.weight", (h,)),
        post_attention_norm=r.take(f"{p}post_attention_layernorm.weight", (h,)),
        qkv=qkv,
        o=o,
        mlp=mlp,
    )


def _load_mlp(r: _Reader, p: str, hidden: int, inter: int) -> MLPWeights:
    gate_up = r.take_fused(
        [f"{p}up_gate_proj.weight", f"{p}gate_up_proj.weight"],
        [(f"{p}gate_proj.weight", inter), (f"{p}up_proj.weight", inter)],
        hidden,
    )
    return MLPWeights(gate_up=gate_up, down=r.take(f"{p}down_proj.weight", (hidden, inter), True))


def _load_moe(r: _Reader, c: ModelConfig, p: str) -> MoEWeights:
    h, e, i = c.hidden_size, c.moe_num_experts, c.moe_intermediate_size
    router = r.take(f"{p}gate.weight", (e, h), linear=True)
    bias = r.take_any(
        [f"{p}moe_statics.e_score_correction_bias", f"{p}gate.moe_statics.e_score_correction_bias"],
        (e,),
    )
    if f"{p}experts.gate_up_proj" in r.ckpt:  # transformers' stacked form
        gate_up = r.take(f"{p}experts.gate_up_proj", (e, 2 * i, h))
        down = r.take(f"{p}experts.down_proj", (e, h, i))
    else:
        experts = [_load_mlp(r, f"{p}experts.{j}.", h, i) for j in range(e)]
        gate_up = np.stack([x.gate_up for x in experts])
        down = np.stack([x.down for x in experts])
    shared = None
    if c.moe_num_shared_experts:
        shared = _load_mlp(r, f"{p}shared_experts.", h, c.shared_intermediate_size)
    return MoEWeights(
        router=router, correction_bias=bias, gate_up=gate_up, down=down, shared=shared
    )
