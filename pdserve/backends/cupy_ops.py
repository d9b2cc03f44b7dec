"""The CuPy backend: the model on one NVIDIA GPU, kernels from csrc/*.cu.

Storage and precision:
- weights bf16 (the router and its correction bias float32, as `fp32=True` asks);
- activations bf16 between ops, every op computing in float32 inside; the residual stream
  that `add_rms_norm` returns is float32, and so are router outputs and the logits (the
  lm_head, a plain `weight`, is the one GEMM with a float32 output);
- the KV pool bf16, one allocation outside CuPy's memory pool (so a CUDA IPC handle of it
  names exactly the pool).
A forward pass never waits on the device (the first one uploads RoPE's frequency table once):
launch sizes come from array shapes and the batch's host copies of its lengths. Dense linears of
a few tokens run our tensor-core GEMV (csrc/gemv.cu), larger ones cuBLAS (cublasGemmEx through
ctypes, float32 accumulation); everything else is csrc/*.cu.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cupy as cp
import numpy as np

from pdserve.backends import (
    cupy_attention,
    cupy_gemv,
    cupy_moe,
    cupy_moe_prefill,
    cupy_prefetch,
    cupy_route_prefill,
)
from pdserve.backends.base import Array, Ops
from pdserve.backends.cupy_graphs import DecodeGraphs
from pdserve.backends.cupy_kernels import (
    BF16,
    Kernels,
    Pending,
    bf16_bits_to_f32,
    norm_threads,
    row_major,
    row_major_float,
    threads_for,
    to_bf16_bits,
)
from pdserve.model.forward_batch import ForwardBatch
from pdserve.model.quant import QuantizedWeight


@dataclass(frozen=True)
class CupyLinear:
    """A linear weight [..., out, in] on the GPU in bf16; `linear` over it gives bf16."""

    data: cp.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def __getitem__(self, i: int) -> CupyLinear:
        """One matrix of a stack (an expert of [E, out, in])."""
        return CupyLinear(self.data[i])


def _data(w: CupyLinear | cp.ndarray) -> cp.ndarray:
    return w.data if isinstance(w, CupyLinear) else w


class CupyOps(Ops):
    """`moe_cublas_min_tokens`: passes of this many tokens or more (prefill) run the experts as
    batched cuBLAS GEMMs over the pairs grouped by expert (backends/cupy_moe_prefill.py); smaller
    ones stream the experts' weights (backends/cupy_moe.py).
    `poison`: outputs start as NaN (tests use it to catch unwritten elements)."""

    name = "cupy"

    def __init__(self, poison: bool = False) -> None:
        self.k = Kernels(poison)
        self.moe_cublas_min_tokens = cupy_moe_prefill.MIN_TOKENS
        self._inv_freq: dict[tuple[float, int], cp.ndarray] = {}

    # -- memory -----------------------------------------------------------------------------
    def weight(self, host: np.ndarray, fp32: bool = False) -> cp.ndarray:
        if fp32:
            return cp.asarray(np.ascontiguousarray(host, dtype=np.float32))
        return cp.asarray(to_bf16_bits(host)).view(BF16)

    def linear_weight(
        self, host: np.ndarray | QuantizedWeight, quantization: str | None
    ) -> CupyLinear:
        if quantization is not None or isinstance(host, QuantizedWeight):
            method = quantization or host.method
            raise ValueError(
                f"--quantization {method}: the cupy backend does not support it yet; "
                "use --quantization none (bf16) or --backend numpy"
            )
        return CupyLinear(self.weight(host))

    def to_device(self, host: np.ndarray) -> cp.ndarray:
        return cp.asarray(host)

    def to_host(self, x: cp.ndarray) -> np.ndarray:
        if x.dtype == BF16:
            return bf16_bits_to_f32(cp.asnumpy(x.view(np.uint16)))
        return cp.asnumpy(x)

    def alloc_kv_cache(self, shape: tuple[int, ...]) -> cp.ndarray:
        nbytes = int(np.prod(shape)) * BF16.itemsize
        mem = cp.cuda.Memory(max(nbytes, 1))  # not from the pool: see the module docstring
        cp.cuda.runtime.memset(mem.ptr, 0, max(nbytes, 1))
        return cp.ndarray(shape, BF16, cp.cuda.MemoryPointer(mem, 0))

    def copy_block(self, dst: Array, dst_block: int, src: Array, src_block: int) -> None:
        """Between device pools, or a device pool and a host NumPy pool (the swap tier, any
        float dtype); bf16 -> float32 -> bf16 is exact."""
        if isinstance(src, cp.ndarray) and isinstance(dst, cp.ndarray):
            dst.view(np.uint16)[:, :, dst_block] = src.view(np.uint16)[:, :, src_block]
        elif isinstance(src, cp.ndarray):  # device -> host
            dst[:, :, dst_block] = self.to_host(src[:, :, src_block])
        elif isinstance(dst, cp.ndarray):  # host -> device
            bits = to_bf16_bits(np.asarray(src[:, :, src_block], dtype=np.float32))
            dst.view(np.uint16)[:, :, dst_block] = cp.asarray(bits)
        else:
            dst[:, :, dst_block] = src[:, :, src_block]

    # -- layers -----------------------------------------------------------------------------
    def embedding(self, table: cp.ndarray, ids: cp.ndarray) -> cp.ndarray:
        ids = row_major(ids, np.int64)
        t, h = ids.shape[0], table.shape[1]
        out = self.k.empty((t, h), BF16)  # [T, H]
        self.k.launch("elementwise.cu", "embedding", (t,), threads_for(min(h, 256)),
                      (row_major(table), ids, out, h))  # fmt: skip
        return out

    def rms_norm(self, x: cp.ndarray, weight: cp.ndarray, eps: float) -> cp.ndarray:
        x = row_major(x)
        out = self.k.empty(x.shape, BF16)
        self.k.launch("norm.cu", "rms_norm", (x.shape[0],), norm_threads(x.shape[1]),
                      (x, weight, out, x.shape[1], float(eps)))  # fmt: skip
        return out

    def add_rms_norm(
        self, x: cp.ndarray, residual: cp.ndarray, weight: cp.ndarray, eps: float
    ) -> tuple[cp.ndarray, cp.ndarray]:
        x, residual = row_major_float(x), row_major_float(residual)
        t, h = x.shape
        out = self.k.empty((t, h), BF16)  # [T, H] normalized
        res_out = self.k.empty((t, h), np.float32)  # [T, H] the residual stream
        args = (x, x.dtype == np.float32, residual, residual.dtype == np.float32, weight, out,
                res_out, h, float(eps))  # fmt: skip
        self.k.launch("norm.cu", "add_rms_norm", (t,), norm_threads(h), args)
        return out, res_out

    def linear(self, x: cp.ndarray, weight: CupyLinear | cp.ndarray) -> cp.ndarray:
        # the GEMV up to a few tokens (decode), cuBLAS above (backends/cupy_gemv.py)
        if isinstance(weight, CupyLinear):
            return cupy_gemv.linear(self.k, x, weight.data, BF16)
        return cupy_gemv.linear(self.k, x, weight, np.dtype(np.float32))  # lm_head: f32 logits

    def _rope_freq(self, theta: float, d: int) -> cp.ndarray:
        inv_freq = self._inv_freq.get((theta, d))
        if inv_freq is None:  # the reference's float32 formula, bit for bit
            host = 1.0 / (np.float32(theta) ** (np.arange(0, d, 2, dtype=np.float32) / d))
            inv_freq = self._inv_freq[(theta, d)] = cp.asarray(host.astype(np.float32))
        return inv_freq

    def rope(self, x: cp.ndarray, positions: cp.ndarray, theta: float) -> cp.ndarray:
        t, heads, d = x.shape
        if x.dtype != BF16 or x.strides[2] != 2:
            x = row_major(x)
        inv_freq = self._rope_freq(theta, d)
        out = self.k.empty((t, heads, d), BF16)  # [T, heads, D], contiguous
        args = (x, np.int64(x.strides[0] // 2), np.int64(x.strides[1] // 2),
                row_major(positions, np.int64), inv_freq, out, heads, d)  # fmt: skip
        self.k.launch("rope_kv.cu", "rope", (t,), threads_for(min(heads * d // 2, 256)), args)
        return out

    def write_kv(
        self, kv_layer: cp.ndarray, k: cp.ndarray, v: cp.ndarray, slot_mapping: cp.ndarray
    ) -> None:
        t, kv_heads, d = k.shape
        k, v = (a if a.dtype == BF16 and a.strides[1:] == (2 * d, 2) else row_major(a)
                for a in (k, v))  # fmt: skip
        args = (k, np.int64(k.strides[0] // 2), v, np.int64(v.strides[0] // 2),
                row_major(slot_mapping, np.int64), kv_layer, np.int64(kv_layer[0].size),
                kv_heads * d)  # fmt: skip
        self.k.launch("rope_kv.cu", "write_kv", (t,), threads_for(min(kv_heads * d, 256)), args)

    def rope_write_kv(
        self, qkv: cp.ndarray, heads: int, kv_heads: int, positions: cp.ndarray, theta: float,
        kv_layer: cp.ndarray, slot_mapping: cp.ndarray,
    ) -> cp.ndarray:  # fmt: skip
        if qkv.dtype != BF16 or qkv.strides[1] != 2:
            qkv = row_major(qkv)
        t, d = qkv.shape[0], qkv.shape[1] // (heads + 2 * kv_heads)
        q = self.k.empty((t, heads, d), BF16)  # [T, heads, D], contiguous
        args = (qkv, np.int64(qkv.strides[0] // 2), row_major(positions, np.int64),
                self._rope_freq(theta, d), q, row_major(slot_mapping, np.int64), kv_layer,
                np.int64(kv_layer[0].size), heads, kv_heads, d)  # fmt: skip
        threads = threads_for(min((heads + kv_heads) * d // 2, 512))
        self.k.launch("rope_kv.cu", "rope_qkv_write_kv", (t,), threads, args)
        return q

    def qkv_rope_write_kv(
        self, x: cp.ndarray, qkv: CupyLinear | cp.ndarray, heads: int, kv_heads: int,
        positions: cp.ndarray, theta: float, kv_layer: cp.ndarray, slot_mapping: cp.ndarray,
    ) -> cp.ndarray:  # fmt: skip
        d = kv_layer.shape[-1]
        w = _data(qkv)
        if not (isinstance(qkv, CupyLinear) and cupy_gemv.fuses_rope(x, w, d)):
            return super().qkv_rope_write_kv(x, qkv, heads, kv_heads, positions, theta,
                                             kv_layer, slot_mapping)  # fmt: skip
        return cupy_gemv.linear_rope_kv(self.k, x, w, heads, kv_heads,
                                        row_major(positions, np.int64), self._rope_freq(theta, d),
                                        kv_layer, row_major(slot_mapping, np.int64))  # fmt: skip

    def paged_attention(
        self, q: cp.ndarray, kv_layer: cp.ndarray, batch: ForwardBatch, scale: float
    ) -> cp.ndarray:
        return cupy_attention.paged_attention(self.k, q, kv_layer, batch, scale)

    def silu_mul(self, gate_up: cp.ndarray) -> cp.ndarray:
        gate_up = row_major(gate_up)
        t, inter = gate_up.shape[0], gate_up.shape[1] // 2
        out = self.k.empty((t, inter), BF16)  # [T, I]
        n = t * inter
        blocks = max(1, min(-(-n // 256), 8 * self.k.num_sms))
        self.k.launch("elementwise.cu", "silu_mul", (blocks,), 256,
                      (gate_up, out, inter, np.int64(n)))  # fmt: skip
        return out

    def moe_route(
        self,
        x: cp.ndarray,
        router: cp.ndarray,
        correction_bias: cp.ndarray,
        top_k: int,
        norm_min: float,
    ) -> tuple[cp.ndarray, cp.ndarray]:
        if cupy_route_prefill.applies(x.shape[0]):  # long prefill: one float32 GEMM
            return cupy_route_prefill.moe_route(self.k, x, router, correction_bias, top_k, norm_min)
        return cupy_moe.moe_route(self.k, x, router, correction_bias, top_k, norm_min)

    def moe(
        self, x: cp.ndarray, router: cp.ndarray, correction_bias: cp.ndarray, top_k: int,
        norm_min: float, gate_up: CupyLinear | cp.ndarray, down: CupyLinear | cp.ndarray,
        shared: tuple[CupyLinear | cp.ndarray, CupyLinear | cp.ndarray] | None = None,
    ) -> cp.ndarray:  # fmt: skip
        if not self._decode_experts(x, _data(gate_up), shared):
            return super().moe(x, router, correction_bias, top_k, norm_min, gate_up, down, shared)
        return self._decode_moe(x, router, correction_bias, top_k, norm_min, gate_up, down,
                                shared)  # fmt: skip

    def moe_add_rms_norm(
        self, x: cp.ndarray, router: cp.ndarray, correction_bias: cp.ndarray, top_k: int,
        norm_min: float, gate_up: CupyLinear | cp.ndarray, down: CupyLinear | cp.ndarray,
        shared: tuple[CupyLinear | cp.ndarray, CupyLinear | cp.ndarray] | None,
        residual: cp.ndarray, weight: cp.ndarray, eps: float,
        prefetch: Sequence[CupyLinear | cp.ndarray] = (),
    ) -> tuple[cp.ndarray, cp.ndarray]:  # fmt: skip
        if not self._decode_experts(x, _data(gate_up), shared):
            return super().moe_add_rms_norm(x, router, correction_bias, top_k, norm_min, gate_up,
                                            down, shared, residual, weight, eps,
                                            prefetch)  # fmt: skip
        # the experts' weighted sum, the residual add and the norm in one launch
        return self._decode_moe(x, router, correction_bias, top_k, norm_min, gate_up, down,
                                shared, (residual, weight, eps), prefetch)  # fmt: skip

    def _decode_moe(
        self, x: cp.ndarray, router: cp.ndarray, correction_bias: cp.ndarray, top_k: int,
        norm_min: float, gate_up: CupyLinear | cp.ndarray, down: CupyLinear | cp.ndarray,
        shared: tuple | None, norm: tuple | None = None, prefetch: Sequence = (),
    ) -> Any:  # fmt: skip
        """`moe` on the decode experts path (or `moe_add_rms_norm` with `norm`). While decode
        graphs are captured, the touched experts' down matrices are prefetched while gate_up
        streams (when few enough), and `prefetch` once gate_up is done."""
        x = row_major(x)
        pending = None
        if shared is not None:
            # the shared experts need no routing: they start first, on a side stream, and
            # stream their weights while the router's latency-bound kernels run
            inter = _data(gate_up).shape[1] // 2
            pending = cupy_moe.shared_on_side(self.k, x, inter, tuple(_data(w) for w in shared))
        weights, ids = self.moe_route(x, router, correction_bias, top_k, norm_min)
        return self.moe_experts(x, weights, ids, gate_up, down, pending, norm, prefetch)

    def _prefetching(self) -> bool:
        """Whether `prefetch` hints start prefetches: only while decode graphs are captured
        (the steps where weight streaming is latency-bound, and replays pay no launch cost)."""
        return self.k.overlap and bool(cupy_prefetch.ENABLED)

    def prefetch(self, *weights: CupyLinear | cp.ndarray) -> None:
        if self._prefetching() and weights:
            cupy_prefetch.start(self.k, cupy_prefetch.l2, self.k, [_data(w) for w in weights])

    def _decode_experts(self, x: cp.ndarray, gate_up: cp.ndarray, shared: tuple | None) -> bool:
        """Whether a batch of x's tokens takes the decode experts path (cupy_moe.decode_experts)
        with these experts (and shared experts)."""
        t, h = x.shape
        if t == 0 or self._prefill_experts(t):
            return False
        inters = [gate_up.shape[1] // 2]
        if shared is not None:
            inters.append(_data(shared[1]).shape[1])
        return all(cupy_moe.streams(h, i) for i in inters)

    def _prefill_experts(self, t: int) -> bool:
        """Whether a pass of t tokens runs the experts as cuBLAS GEMMs (cupy_moe_prefill)."""
        return t >= self.moe_cublas_min_tokens and cupy_moe_prefill.applies(t)

    def moe_experts(
        self,
        x: cp.ndarray,
        weights: cp.ndarray,
        ids: cp.ndarray,
        gate_up: CupyLinear | cp.ndarray,
        down: CupyLinear | cp.ndarray,
        shared: tuple[CupyLinear | cp.ndarray, CupyLinear | cp.ndarray] | Pending | None = None,
        norm: tuple[cp.ndarray, cp.ndarray, float] | None = None,
        prefetch: Sequence[CupyLinear | cp.ndarray] = (),
    ) -> Any:
        """`shared` may also be CupyOps.moe's shared experts' output, on its way (`Pending`).
        With `norm` = (residual, weight, eps), returns `add_rms_norm` of the output instead,
        fused into the experts' last launch on the decode path. `prefetch`: weights read after
        the experts (`prefetch` hints), prefetched on the decode path while decode graphs are
        captured."""
        gate_up, down = _data(gate_up), _data(down)
        args = (row_major(x), row_major(weights, np.float32), row_major(ids, np.int32),
                row_major(gate_up), row_major(down))  # fmt: skip
        if isinstance(shared, Pending) or self._decode_experts(x, gate_up, shared):
            if isinstance(shared, tuple):
                shared = tuple(_data(w) for w in shared)
            hints = [_data(w) for w in prefetch] if self._prefetching() else None
            return cupy_moe.decode_experts(self.k, *args, shared, norm=norm, prefetch=hints)
        out = self._moe_experts(args, shared)
        return out if norm is None else self.add_rms_norm(out, *norm)

    def _moe_experts(self, args: tuple, shared: tuple | None) -> cp.ndarray:
        """The experts off the decode path: cuBLAS GEMMs for prefill, GEMV-like kernels over
        pairs for dims the decode kernels do not take."""
        x, gate_up = args[0], args[3]
        if self._prefill_experts(x.shape[0]):
            counted = cupy_moe_prefill.count(self.k, args[2], gate_up.shape[0])
            # queued behind the counting: the GPU runs the shared experts while the host waits
            # for the counts and plans the routed experts' GEMMs
            addend = None if shared is None else self.mlp(x, *shared)
            return cupy_moe_prefill.moe_experts(self.k, *args, counted=counted, addend=addend)
        out = cupy_moe.moe_experts(self.k, *args)
        return out if shared is None else out + self.mlp(x, *shared)

    # -- decode graphs and sampling ---------------------------------------------------------
    def decode_graphs(
        self, forward: object, kv_cache: cp.ndarray, block_size: int, max_blocks_per_seq: int,
        sizes: object,
    ) -> DecodeGraphs:  # fmt: skip
        def joined(batch: ForwardBatch, kv: cp.ndarray) -> cp.ndarray:
            out = forward(batch, kv)
            self.k.join()  # a capture must end with its side streams joined
            return out

        graphs = DecodeGraphs(joined, kv_cache, block_size, max_blocks_per_seq, sizes)
        self.k.overlap = True  # each kernel's launch hides behind the one before it
        try:
            graphs.capture()
        finally:
            self.k.overlap = False
        return graphs

    def greedy_sample(self, logits: cp.ndarray) -> tuple[np.ndarray, np.ndarray]:
        b, v = logits.shape
        if logits.dtype != np.float32 or logits.strides[1] != 4:
            logits = row_major(logits, np.float32)
        ids = self.k.empty((b,), np.int64)
        logprobs = self.k.empty((b,), np.float32)
        self.k.launch("sampling.cu", "greedy_sample", (b,), 1024,
                      (logits, np.int64(logits.strides[0] // 4), v, ids, logprobs))  # fmt: skip
        return cp.asnumpy(ids), cp.asnumpy(logprobs)
