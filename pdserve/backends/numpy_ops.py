"""The NumPy backend: float32 on the CPU. The reference every other backend is checked against."""

from __future__ import annotations

import numpy as np

from pdserve.backends.base import Ops
from pdserve.model.forward_batch import ForwardBatch
from pdserve.model.quant import QuantizedWeight, quantize


class NumpyOps(Ops):
    name = "numpy"

    def weight(self, host: np.ndarray, fp32: bool = False) -> np.ndarray:
        return np.ascontiguousarray(host, dtype=np.float32)

    def linear_weight(
        self, host: np.ndarray, quantization: str | None
    ) -> np.ndarray | QuantizedWeight:
        if isinstance(host, QuantizedWeight):  # quantized whole, then sharded (tensor parallel)
            return host
        return self.weight(host) if quantization is None else quantize(host, quantization)

    def to_device(self, host: np.ndarray) -> np.ndarray:
        return np.asarray(host)

    def to_host(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x)

    def alloc_kv_cache(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.zeros(shape, dtype=np.float32)

    def copy_block(self, dst: np.ndarray, dst_block: int, src: np.ndarray, src_block: int) -> None:
        dst[:, :, dst_block] = src[:, :, src_block]

    def embedding(self, table: np.ndarray, ids: np.ndarray) -> np.ndarray:
        return table[ids]

    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        var = np.mean(np.square(x), axis=-1, keepdims=True)  # [T, 1]
        return weight * (x / np.sqrt(var + np.float32(eps)))

    def add_rms_norm(
        self, x: np.ndarray, residual: np.ndarray, weight: np.ndarray, eps: float
    ) -> tuple[np.ndarray, np.ndarray]:
        residual = residual + x
        return self.rms_norm(residual, weight, eps), residual

    def linear(self, x: np.ndarray, weight: np.ndarray | QuantizedWeight) -> np.ndarray:
        if isinstance(weight, QuantizedWeight):
            weight = weight.dequantize()
        return x @ weight.T

    def rope(self, x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
        d = x.shape[-1]
        inv_freq = 1.0 / (np.float32(theta) ** (np.arange(0, d, 2, dtype=np.float32) / d))
        freqs = positions.astype(np.float32)[:, None] * inv_freq.astype(np.float32)  # [T, D/2]
        cos = np.cos(freqs)[:, None, :]  # [T, 1, D/2]
        sin = np.sin(freqs)[:, None, :]
        even, odd = x[..., 0::2], x[..., 1::2]  # [T, heads, D/2]
        out = np.empty_like(x)
        out[..., 0::2] = even * cos - odd * sin
        out[..., 1::2] = odd * cos + even * sin
        return out

    def write_kv(
        self, kv_layer: np.ndarray, k: np.ndarray, v: np.ndarray, slot_mapping: np.ndarray
    ) -> None:
        block_size = kv_layer.shape[2]
        blocks, offsets = np.divmod(slot_mapping, block_size)
        kv_layer[0, blocks, offsets] = k
        kv_layer[1, blocks, offsets] = v

    def paged_attention(
        self, q: np.ndarray, kv_layer: np.ndarray, batch: ForwardBatch, scale: float
    ) -> np.ndarray:
        t, heads, d = q.shape
        kv_heads = kv_layer.shape[3]
        group = heads // kv_heads
        bs = batch.block_size
        starts = batch.query_start_loc_host or batch.query_start_loc.tolist()
        lens = batch.seq_lens_host or batch.seq_lens.tolist()
        out = np.empty_like(q)
        for s, ctx in enumerate(lens):
            q0, q1 = starts[s], starts[s + 1]
            n = q1 - q0
            if n == 0:
                continue
            blocks = batch.block_tables[s, : -(-ctx // bs)]
            k = kv_layer[0, blocks].reshape(-1, kv_heads, d)[:ctx]  # [C, kv_heads, D]
            v = kv_layer[1, blocks].reshape(-1, kv_heads, d)[:ctx]
            qs = q[q0:q1].reshape(n, kv_heads, group, d)  # [n, kv, g, D]
            scores = np.einsum("nkgd,ckd->kgnc", qs, k) * np.float32(scale)  # [kv, g, n, C]
            # query j sits at position ctx - n + j and sees keys 0..that position
            causal = np.arange(ctx)[None, :] > (ctx - n + np.arange(n))[:, None]  # [n, C]
            scores = np.where(causal, -np.inf, scores)
            scores -= scores.max(axis=-1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(axis=-1, keepdims=True)
            o = np.einsum("kgnc,ckd->nkgd", probs, v)  # [n, kv, g, D]
            out[q0:q1] = o.reshape(n, heads, d)
        return out

    def silu_mul(self, gate_up: np.ndarray) -> np.ndarray:
        gate, up = np.split(gate_up, 2, axis=-1)
        return gate / (1.0 + np.exp(-gate)) * up

    def moe_route(
        self,
        x: np.ndarray,
        router: np.ndarray,
        correction_bias: np.ndarray,
        top_k: int,
        norm_min: float,
    ) -> tuple[np.ndarray, np.ndarray]:
        logits = x.astype(np.float32) @ router.T  # [T, E]
        logits -= logits.max(axis=-1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=-1, keepdims=True)
        biased = probs + correction_bias  # selection only
        ids = np.argsort(-biased, axis=-1, kind="stable")[:, :top_k]  # [T, K]
        weights = np.take_along_axis(probs, ids, axis=-1)
        weights /= np.maximum(weights.sum(axis=-1, keepdims=True), np.float32(norm_min))
        return weights.astype(np.float32), ids

    def moe_experts(
        self,
        x: np.ndarray,
        weights: np.ndarray,
        ids: np.ndarray,
        gate_up: np.ndarray,
        down: np.ndarray,
        shared: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> np.ndarray:
        out = np.zeros_like(x) if shared is None else self.mlp(x, *shared)
        flat = ids.reshape(-1)  # [T*K]
        order = np.argsort(flat, kind="stable")
        experts, starts = np.unique(flat[order], return_index=True)
        bounds = np.append(starts, flat.size)
        # one GEMM per expert over the tokens routed to it
        for e, lo, hi in zip(experts, bounds[:-1], bounds[1:]):
            pairs = order[lo:hi]
            tokens = pairs // ids.shape[1]
            h = self.linear(self.silu_mul(self.linear(x[tokens], gate_up[e])), down[e])  # [n, H]
            np.add.at(out, tokens, h * weights.reshape(-1)[pairs, None])
        return out
