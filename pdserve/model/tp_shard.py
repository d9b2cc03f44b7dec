"""Tensor-parallel sharding of loaded weights (Megatron-style, as vLLM and FastDeploy shard).

Column-parallel: q/k/v and gate/up rows (attention heads, MLP and expert intermediate units);
row-parallel: o and down columns, whose partial outputs the ranks sum with an all-reduce.
Vocab-parallel lm_head: each rank scores a contiguous slice of the vocabulary and rank 0 gathers
the slices. Embedding, norms and the router stay whole on every rank. When there are more ranks
than KV heads, each KV head is replicated on the ranks whose query heads read it.

Quantized weights are quantized whole and then sharded, so every rank holds exactly the codes
and scales the unsharded model would: output is the same at every TP size.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from pdserve.config import ModelConfig
from pdserve.model.quant import QuantizedWeight, quantize
from pdserve.model.weights import LayerWeights, MLPWeights, ModelWeights, MoEWeights


@dataclass(frozen=True)
class TPLayout:
    """What rank `rank` of `size` holds."""

    rank: int
    size: int
    heads: int  # query heads of this rank
    kv_heads: int  # KV heads of this rank (replicas included)
    first_head: int
    first_kv_head: int
    vocab_start: int  # lm_head rows [vocab_start, vocab_end)
    vocab_end: int

    @classmethod
    def of(cls, c: ModelConfig, rank: int, size: int) -> TPLayout:
        """ValueError naming --tensor-parallel-size when the model does not split `size` ways."""
        flag = f"--tensor-parallel-size {size}"
        if size < 1 or not 0 <= rank < size:
            raise ValueError(f"{flag}: must be >= 1")
        h, kv = c.num_attention_heads, c.num_key_value_heads
        if h % size:
            raise ValueError(f"{flag}: the model's {h} attention heads do not split evenly")
        if kv % size and size % kv:
            raise ValueError(f"{flag}: the model's {kv} KV heads neither split evenly nor "
                             "replicate evenly over the ranks")  # fmt: skip
        sizes = {"intermediate_size": c.intermediate_size}
        if c.moe_num_experts:
            sizes["moe_intermediate_size"] = c.moe_intermediate_size
            if c.moe_num_shared_experts:
                sizes["shared experts' intermediate size"] = c.shared_intermediate_size
        for name, n in sizes.items():
            if n % size:
                raise ValueError(f"{flag}: the model's {name} {n} does not split evenly")
        kv_per_rank = max(1, kv // size)
        bounds = np.linspace(0, c.vocab_size, size + 1).astype(int)
        return cls(
            rank=rank, size=size, heads=h // size, kv_heads=kv_per_rank,
            first_head=rank * (h // size),
            first_kv_head=rank * kv // size if kv >= size else rank // (size // kv),
            vocab_start=int(bounds[rank]), vocab_end=int(bounds[rank + 1]),
        )  # fmt: skip

    def part(self, n: int) -> np.ndarray:
        """This rank's indices of a dimension of n split evenly."""
        k = n // self.size
        return np.arange(self.rank * k, (self.rank + 1) * k)


def shard_weights(
    w: ModelWeights, c: ModelConfig, layout: TPLayout, quantization: str | None
) -> ModelWeights:
    """Rank `layout.rank`'s part of `w` (float32, pdserve's layout). Linear weights come back
    quantized already when `quantization` is set."""
    d = c.head_dim
    q_rows = _heads(layout.first_head, layout.heads, d)
    kv_rows = _heads(layout.first_kv_head, layout.kv_heads, d)
    qkv_rows = np.concatenate([q_rows, c.q_size + kv_rows, c.q_size + c.kv_size + kv_rows])

    def linear(x: np.ndarray, index: np.ndarray, axis: int) -> np.ndarray | QuantizedWeight:
        if quantization is None:
            return np.ascontiguousarray(np.take(x, index, axis=axis))
        return quantize(x, quantization).take(index, axis)

    def mlp(m: MLPWeights) -> MLPWeights:
        inter = m.down.shape[-1]
        part = layout.part(inter)
        gate_up = linear(m.gate_up, np.concatenate([part, inter + part]), -2)
        return MLPWeights(gate_up=gate_up, down=linear(m.down, part, -1))

    layers = []
    for lw in w.layers:
        if isinstance(lw.mlp, MoEWeights):
            moe = lw.mlp
            experts = mlp(MLPWeights(moe.gate_up, moe.down))
            shared = mlp(moe.shared) if moe.shared is not None else None
            sharded_mlp: MLPWeights | MoEWeights = replace(
                moe, gate_up=experts.gate_up, down=experts.down, shared=shared
            )
        else:
            sharded_mlp = mlp(lw.mlp)
        layers.append(
            LayerWeights(
                input_norm=lw.input_norm,
                post_attention_norm=lw.post_attention_norm,
                qkv=linear(lw.qkv, qkv_rows, -2),
                o=linear(lw.o, q_rows, -1),
                mlp=sharded_mlp,
            )
        )
    lm_head = w.lm_head[layout.vocab_start : layout.vocab_end]  # a view when tied
    return ModelWeights(embed=w.embed, layers=layers, norm=w.norm, lm_head=lm_head)


def _heads(first: int, count: int, head_dim: int) -> np.ndarray:
    return np.arange(first * head_dim, (first + count) * head_dim)
