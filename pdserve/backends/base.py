"""The `ops` interface the model is written against; one implementation per compute backend."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np

from pdserve.model.forward_batch import ForwardBatch

Array = Any  # a backend array: numpy.ndarray or cupy.ndarray


class Ops(ABC):
    """Every numeric operation of the ERNIE-4.5 MoE forward pass.

    Shapes use T tokens, H hidden, V vocab, E experts, K experts per token, D head_dim.
    Activations are float32 on the NumPy backend; a GPU backend may store bf16 but accumulates
    in float32. Router math is always float32.
    """

    name: str

    # -- optional: what a GPU backend adds ------------------------------------------------------
    def decode_graphs(
        self, forward: Any, kv_cache: Array, block_size: int, max_blocks_per_seq: int,
        sizes: Any,
    ) -> Any:  # fmt: skip
        """Decode steps captured as graphs (a `DecodeGraphs`, see backends/cupy_graphs.py), or
        None on a backend without them."""
        return None

    def greedy_sample(self, logits: Array) -> tuple[np.ndarray, np.ndarray] | None:
        """(argmax ids [B] int64, their log-probabilities [B] float32) on the host, computed
        where the logits [B, V] are; None when the backend leaves sampling to the host."""
        return None

    # -- memory -----------------------------------------------------------------------------
    @abstractmethod
    def weight(self, host: np.ndarray, fp32: bool = False) -> Array:
        """A float32 host tensor on the device, in the backend's weight dtype (fp32 if asked)."""

    @abstractmethod
    def linear_weight(self, host: np.ndarray, quantization: str | None) -> Array:
        """A linear weight [..., out, in], quantized at load when asked (wint8, wint4)."""

    @abstractmethod
    def to_device(self, host: np.ndarray) -> Array:
        """Move a host array (ids, positions, tables) to the device unchanged."""

    @abstractmethod
    def to_host(self, x: Array) -> np.ndarray:
        """Copy a device array to a host float32/int NumPy array."""

    @abstractmethod
    def alloc_kv_cache(self, shape: tuple[int, ...]) -> Array:
        """One zeroed allocation [layers, 2, blocks, block_size, kv_heads, D] for the KV pool."""

    @abstractmethod
    def copy_block(self, dst: Array, dst_block: int, src: Array, src_block: int) -> None:
        """dst[:, :, dst_block] = src[:, :, src_block] between KV pools (device or host)."""

    # -- layers -----------------------------------------------------------------------------
    @abstractmethod
    def embedding(self, table: Array, ids: Array) -> Array:
        """[V, H], [T] -> [T, H]"""

    @abstractmethod
    def rms_norm(self, x: Array, weight: Array, eps: float) -> Array:
        """[T, H] -> [T, H], statistics in float32."""

    @abstractmethod
    def add_rms_norm(
        self, x: Array, residual: Array, weight: Array, eps: float
    ) -> tuple[Array, Array]:
        """residual' = x + residual; returns (rms_norm(residual'), residual')."""

    @abstractmethod
    def linear(self, x: Array, weight: Array) -> Array:
        """[T, in] x [out, in] -> [T, out]"""

    @abstractmethod
    def rope(self, x: Array, positions: Array, theta: float) -> Array:
        """Interleaved rotary embedding (pairs 2i, 2i+1) in float32: [T, heads, D] -> same."""

    @abstractmethod
    def write_kv(self, kv_layer: Array, k: Array, v: Array, slot_mapping: Array) -> None:
        """Store k, v [T, kv_heads, D] into kv_layer [2, blocks, block_size, kv_heads, D]."""

    def rope_write_kv(
        self, qkv: Array, heads: int, kv_heads: int, positions: Array, theta: float,
        kv_layer: Array, slot_mapping: Array,
    ) -> Array:  # fmt: skip
        """The qkv projection's output [T, (heads + 2 kv_heads) * D] (q | k | v): rotates q and k,
        stores k and v into kv_layer at slot_mapping, returns q [T, heads, D]. Backends may fuse
        it; this is `rope`, `rope` and `write_kv` in turn."""
        t, d = qkv.shape[0], qkv.shape[1] // (heads + 2 * kv_heads)
        q = qkv[:, : heads * d].reshape(t, heads, d)
        k = qkv[:, heads * d : (heads + kv_heads) * d].reshape(t, kv_heads, d)
        v = qkv[:, (heads + kv_heads) * d :].reshape(t, kv_heads, d)
        q = self.rope(q, positions, theta)
        self.write_kv(kv_layer, self.rope(k, positions, theta), v, slot_mapping)
        return q

    def qkv_rope_write_kv(
        self, x: Array, qkv: Array, heads: int, kv_heads: int, positions: Array, theta: float,
        kv_layer: Array, slot_mapping: Array,
    ) -> Array:  # fmt: skip
        """`linear` of x [T, H] by the qkv weight, then `rope_write_kv`: returns q [T, heads, D].
        Backends may fuse them."""
        return self.rope_write_kv(self.linear(x, qkv), heads, kv_heads, positions, theta,
                                  kv_layer, slot_mapping)  # fmt: skip

    @abstractmethod
    def paged_attention(
        self, q: Array, kv_layer: Array, batch: ForwardBatch, scale: float
    ) -> Array:
        """Causal GQA attention of q [T, heads, D] over each sequence's paged KV: [T, heads, D]."""

    @abstractmethod
    def silu_mul(self, gate_up: Array) -> Array:
        """[T, 2I] (gate | up) -> silu(gate) * up, [T, I]"""

    @abstractmethod
    def moe_route(
        self, x: Array, router: Array, correction_bias: Array, top_k: int, norm_min: float
    ) -> tuple[Array, Array]:
        """Float32 softmax router; experts chosen by top-k of p + bias, weighted by p renormalized.

        Returns (weights [T, K] float32, expert ids [T, K] int).
        """

    @abstractmethod
    def moe_experts(
        self, x: Array, weights: Array, ids: Array, gate_up: Array, down: Array,
        shared: tuple[Array, Array] | None = None,
    ) -> Array:  # fmt: skip
        """Sum over each token's K experts of weight * down(silu_mul(gate_up(x))): [T, H].
        `shared` = (gate_up [2Is, H], down [H, Is]): the shared experts, fused as one MLP
        whose output is added unweighted."""

    def moe(
        self, x: Array, router: Array, correction_bias: Array, top_k: int, norm_min: float,
        gate_up: Array, down: Array, shared: tuple[Array, Array] | None = None,
    ) -> Array:  # fmt: skip
        """A MoE layer: `moe_route`, then `moe_experts`. Backends may start the shared experts
        before the routing, so that the two overlap."""
        weights, ids = self.moe_route(x, router, correction_bias, top_k, norm_min)
        return self.moe_experts(x, weights, ids, gate_up, down, shared)

    def moe_add_rms_norm(
        self, x: Array, router: Array, correction_bias: Array, top_k: int, norm_min: float,
        gate_up: Array, down: Array, shared: tuple[Array, Array] | None,
        residual: Array, weight: Array, eps: float, prefetch: Sequence[Array] = (),
    ) -> tuple[Array, Array]:  # fmt: skip
        """`add_rms_norm(moe(...), residual, weight, eps)`: a MoE layer's output added to the
        residual stream and normalized for what comes next. Backends may fuse the experts'
        weighted sum into the norm. `prefetch`: weights read after this (`prefetch`), which a
        backend may bring in at whatever point of the layer suits it."""
        self.prefetch(*prefetch)
        out = self.moe(x, router, correction_bias, top_k, norm_min, gate_up, down, shared)
        return self.add_rms_norm(out, residual, weight, eps)

    def prefetch(self, *weights: Array) -> None:
        """A hint: these weights are read soon. A backend may start bringing them closer (into
        its cache) now, beside the work queued next; the default does nothing."""
        return None

    def mlp(self, x: Array, gate_up: Array, down: Array) -> Array:
        """SwiGLU MLP, down(silu_mul(gate_up(x))): [T, H]."""
        return self.linear(self.silu_mul(self.linear(x, gate_up)), down)
