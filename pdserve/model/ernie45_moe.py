"""ERNIE-4.5 MoE (`Ernie4_5_MoeForCausalLM`), written once against the `ops` interface.

Class names mirror the checkpoint's modules. Layers are plain objects holding backend arrays;
a forward pass reads everything it needs from its `ForwardBatch` and the KV pool it is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pdserve.backends.base import Array, Ops
from pdserve.config import ModelConfig
from pdserve.engine.tp_group import SingleRank, TPGroup
from pdserve.model.forward_batch import ForwardBatch
from pdserve.model.tp_shard import TPLayout, shard_weights
from pdserve.model.weights import (
    LayerWeights,
    MLPWeights,
    ModelWeights,
    MoEWeights,
    load_weights,
)


class ErnieMoeAttention:
    """This rank's heads (all of them at TP 1); the output is summed over the ranks."""

    def __init__(self, ops: Ops, config: ModelConfig, w: LayerWeights, quant: str | None,
                 tp: TPGroup, layout: TPLayout) -> None:  # fmt: skip
        self.ops = ops
        self.tp = tp
        self.heads = layout.heads
        self.kv_heads = layout.kv_heads
        self.head_dim = config.head_dim
        self.q_size = layout.heads * config.head_dim
        self.kv_size = layout.kv_heads * config.head_dim
        self.theta = config.rope_theta
        self.scale = config.head_dim**-0.5
        self.qkv = ops.linear_weight(w.qkv, quant)
        self.o = ops.linear_weight(w.o, quant)

    def __call__(
        self, x: Array, kv_layer: Array, batch: ForwardBatch, prefetch: Sequence[Array] = ()
    ) -> Array:
        """`prefetch`: weights read after this (`Ops.prefetch`), hinted with o_proj's while
        the attention runs."""
        ops, t = self.ops, x.shape[0]
        q = ops.qkv_rope_write_kv(x, self.qkv, self.heads, self.kv_heads, batch.positions,
                                  self.theta, kv_layer, batch.slot_mapping)  # fmt: skip
        # q: [T, heads, D]; K, V in the pool
        ops.prefetch(self.o, *prefetch)  # read once the attention is done
        out = ops.paged_attention(q, kv_layer, batch, self.scale)  # [T, heads, D]
        return self.tp.all_reduce(ops.linear(out.reshape(t, self.q_size), self.o))  # [T, H]


class ErnieMoeMLP:
    """SwiGLU MLP: the dense layers and the fused shared experts. With tensor parallelism each
    rank holds a slice of the intermediate units and returns its partial sum; `tp` (dense
    layers) sums them, shared experts leave that to their sparse block."""

    def __init__(self, ops: Ops, w: MLPWeights, quant: str | None, tp: TPGroup | None) -> None:
        self.ops = ops
        self.tp = tp
        self.gate_up = ops.linear_weight(w.gate_up, quant)
        self.down = ops.linear_weight(w.down, quant)

    @property
    def first_weights(self) -> tuple[Array, ...]:
        """What the MLP reads first (prefetch hints)."""
        return (self.gate_up,)

    def __call__(self, x: Array) -> Array:
        out = self.ops.mlp(x, self.gate_up, self.down)
        return out if self.tp is None else self.tp.all_reduce(out)

    def add_rms_norm(
        self, x: Array, residual: Array, weight: Array, eps: float, prefetch: Sequence[Array] = ()
    ) -> tuple[Array, Array]:
        """The MLP's output of x added to the residual stream and normalized by `weight`:
        (normalized, residual'). `prefetch`: weights read next (`Ops.prefetch`)."""
        self.ops.prefetch(*prefetch)
        return self.ops.add_rms_norm(self(x), residual, weight, eps)


class ErnieMoeSparseBlock:
    """Routed experts (top-k of a float32 softmax plus correction bias) and shared experts."""

    def __init__(
        self, ops: Ops, config: ModelConfig, w: MoEWeights, quant: str | None, tp: TPGroup
    ) -> None:
        self.ops = ops
        self.tp = tp
        self.top_k = config.moe_k
        self.norm_min = config.moe_norm_min
        self.router = ops.weight(w.router, fp32=True)
        self.correction_bias = ops.weight(w.correction_bias, fp32=True)
        self.gate_up = ops.linear_weight(w.gate_up, quant)  # [E, 2I, H]
        self.down = ops.linear_weight(w.down, quant)  # [E, H, I]
        self.shared = ErnieMoeMLP(ops, w.shared, quant, None) if w.shared is not None else None

    def _shared(self) -> tuple[Array, Array] | None:
        return None if self.shared is None else (self.shared.gate_up, self.shared.down)

    @property
    def first_weights(self) -> tuple[Array, ...]:
        """What the block reads before routing is done: the shared experts' gate_up."""
        return () if self.shared is None else (self.shared.gate_up,)

    def __call__(self, x: Array) -> Array:
        out = self.ops.moe(x, self.router, self.correction_bias, self.top_k, self.norm_min,
                           self.gate_up, self.down, self._shared())  # fmt: skip
        return self.tp.all_reduce(out)  # [T, H]

    def add_rms_norm(
        self, x: Array, residual: Array, weight: Array, eps: float, prefetch: Sequence[Array] = ()
    ) -> tuple[Array, Array]:
        """The layer's output of x added to the residual stream and normalized by `weight`:
        (normalized, residual'). On one rank the backend may fuse the experts' weighted sum
        into the norm; across ranks the sum is all-reduced first. `prefetch`: weights read
        next (`Ops.prefetch`), which the backend may bring in while the experts run."""
        if self.tp.size > 1:
            self.ops.prefetch(*prefetch)
            return self.ops.add_rms_norm(self(x), residual, weight, eps)
        return self.ops.moe_add_rms_norm(x, self.router, self.correction_bias, self.top_k,
                                         self.norm_min, self.gate_up, self.down, self._shared(),
                                         residual, weight, eps, prefetch)  # fmt: skip


class ErnieMoeDecoderLayer:
    def __init__(self, ops: Ops, config: ModelConfig, w: LayerWeights, quant: str | None,
                 tp: TPGroup, layout: TPLayout) -> None:  # fmt: skip
        self.ops = ops
        self.eps = config.rms_norm_eps
        self.input_norm = ops.weight(w.input_norm)
        self.post_attention_norm = ops.weight(w.post_attention_norm)
        self.self_attn = ErnieMoeAttention(ops, config, w, quant, tp, layout)
        self.mlp: ErnieMoeMLP | ErnieMoeSparseBlock
        if isinstance(w.mlp, MoEWeights):
            self.mlp = ErnieMoeSparseBlock(ops, config, w.mlp, quant, tp)
        else:
            self.mlp = ErnieMoeMLP(ops, w.mlp, quant, tp)

    def __call__(
        self, h: Array, residual: Array, kv_layer: Array, batch: ForwardBatch, next_norm: Array,
        prefetch: Sequence[Array] = (),
    ) -> tuple[Array, Array]:  # fmt: skip
        """h: this layer's input, already normalized by `input_norm`; residual: the stream it
        was normalized from. Returns (the stream after this layer, normalized by `next_norm`,
        which is the next layer's `input_norm` or the final norm; the stream itself). Each norm
        runs where the sum before it is made, so a backend can fuse the two. `prefetch`: the
        weights the next layer reads first (`Ops.prefetch`)."""
        h = self.self_attn(h, kv_layer, batch, self.mlp.first_weights)
        h, residual = self.ops.add_rms_norm(h, residual, self.post_attention_norm, self.eps)
        return self.mlp.add_rms_norm(h, residual, next_norm, self.eps, prefetch)


class ErnieMoeForCausalLM:
    """The whole model, or one tensor-parallel rank's shard of it (`tp`, `layout`). `forward`
    writes the batch's KV into `kv_cache` and returns logits."""

    def __init__(
        self,
        ops: Ops,
        config: ModelConfig,
        weights: ModelWeights,
        quantization: str | None = None,
        tp: TPGroup | None = None,
    ) -> None:
        self.ops = ops
        self.config = config
        self.quantization = quantization  # of the decoder layers' linears; embeddings stay float
        self.tp: TPGroup = tp or SingleRank()
        self.layout = TPLayout.of(config, self.tp.rank, self.tp.size)
        if self.tp.size > 1:  # linears come back quantized already, sharded after quantizing
            weights = shard_weights(weights, config, self.layout, quantization)
        self.embed = ops.weight(weights.embed)
        self.layers = [
            ErnieMoeDecoderLayer(ops, config, w, quantization, self.tp, self.layout)
            for w in weights.layers
        ]
        self.norm = ops.weight(weights.norm)
        tied = weights.lm_head is weights.embed
        self.lm_head = self.embed if tied else ops.weight(weights.lm_head)
        if tied and self.tp.size > 1:  # this rank's vocabulary slice of the embedding
            self.lm_head = self.embed[self.layout.vocab_start : self.layout.vocab_end]

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """[layers, 2, blocks, block_size, kv_heads, head_dim] of one rank's KV pool."""
        c = self.config
        return (c.num_hidden_layers, 2, num_blocks, block_size, self.layout.kv_heads, c.head_dim)

    def forward(self, batch: ForwardBatch, kv_cache: Array) -> Array | None:
        """Logits [L, V] float32 for the rows batch.logits_indices of the T input tokens (on
        rank 0; other ranks return None)."""
        residual = self.ops.embedding(self.embed, batch.input_ids)  # [T, H]
        x = self.ops.rms_norm(residual, self.layers[0].input_norm, self.config.rms_norm_eps)
        next_norms = [layer.input_norm for layer in self.layers[1:]] + [self.norm]
        next_qkv = [(layer.self_attn.qkv,) for layer in self.layers[1:]] + [()]
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, kv_cache[i], batch, next_norms[i], next_qkv[i])
            if batch.after_layer is not None:
                batch.after_layer(i)
        x = x[batch.logits_indices]  # [L, H]
        return self.tp.gather(self.ops.linear(x, self.lm_head))  # [L, V]


def load_model(
    model_dir: str | Path,
    ops: Ops,
    progress: bool = True,
    quantization: str | None = None,
    tp: TPGroup | None = None,
) -> ErnieMoeForCausalLM:
    """Read config.json and the safetensors checkpoint of `model_dir` onto the backend `ops`,
    quantizing the decoder layers' linears at load if asked (wint8, wint4, block_wise_fp8), and
    keeping only rank tp.rank's shard."""
    config = ModelConfig.from_hf(model_dir)
    if tp is not None:
        TPLayout.of(config, tp.rank, tp.size)  # refuse a size the model does not split into
    weights = load_weights(model_dir, config, progress)
    return ErnieMoeForCausalLM(ops, config, weights, quantization, tp)
