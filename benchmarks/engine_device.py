"""The GPU (or CPU) a benchmark runs on: events, spin kernel, random full-size weights drawn on
the device, and the copy and GEMM ceilings the floors divide by."""

from __future__ import annotations

import gc
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from pdserve.backends.base import Ops
from pdserve.config import ModelConfig
from pdserve.model.weights import LayerWeights, MLPWeights, ModelWeights, MoEWeights

STD = 0.02
_CHUNK = 1 << 28  # elements drawn per call when filling big arrays

_SPIN = r"""
extern "C" __global__ void spin(unsigned long long ns) {
  unsigned long long t0, t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  do {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  } while (t - t0 < ns);
}
"""


class _HostEvent:
    """A CUDA event's stand-in on the CPU backend: the host clock when recorded."""

    t = 0.0

    def record(self) -> None:
        self.t = time.perf_counter()


class Device:
    """What the benchmark needs beyond `Ops`: random arrays drawn where the model runs,
    synchronisation, events, and a kernel that holds the GPU for a while."""

    def __init__(self, backend: str) -> None:
        self.gpu = backend == "cupy"
        self.rng = np.random.default_rng(0)
        if self.gpu:
            import cupy as cp

            from pdserve.backends.cupy_kernels import BF16

            self.xp, self.dtype = cp, BF16
            self._spin = cp.RawKernel(_SPIN, "spin")
        else:
            self.xp, self.dtype = np, np.dtype(np.float32)

    def sync(self) -> None:
        if self.gpu:
            self.xp.cuda.get_current_stream().synchronize()

    def event(self) -> Any:
        return self.xp.cuda.Event() if self.gpu else _HostEvent()

    def elapsed_ms(self, start: Any, end: Any) -> float:
        if self.gpu:
            return float(self.xp.cuda.get_elapsed_time(start, end))
        return (end.t - start.t) * 1e3

    def spin(self, seconds: float) -> None:
        if self.gpu:
            self._spin((1,), (1,), (np.uint64(int(seconds * 1e9)),))

    def randn(self, shape: tuple[int, ...], std: float = 1.0, fp32: bool = False) -> Any:
        """Normal(0, std): float32 if asked, else the weight dtype (bf16 on the GPU)."""
        if fp32 and self.gpu:
            return self.xp.random.standard_normal(shape, dtype=np.float32) * np.float32(std)
        out = self.xp.empty(shape, dtype=np.float32 if fp32 else self.dtype)
        self.fill_randn(out, std)
        return out

    def fill_randn(self, arr: Any, std: float = 1.0) -> None:
        """Overwrite the contiguous `arr` with Normal(0, std) values (bf16: float32 truncated)."""
        if not self.gpu:
            arr[...] = self.rng.standard_normal(arr.shape, dtype=np.float32) * np.float32(std)
            return
        cp = self.xp
        flat = arr.view(cp.uint16).reshape(-1)
        for a in range(0, flat.size, _CHUNK):
            f = cp.random.standard_normal(min(_CHUNK, flat.size - a), dtype=cp.float32)
            f *= np.float32(std)
            flat[a : a + f.size] = (f.view(cp.uint32) >> 16).astype(cp.uint16)

    def ones(self, n: int) -> Any:
        if not self.gpu:
            return np.ones(n, np.float32)
        return self.xp.full(n, 0x3F80, dtype=self.xp.uint16).view(self.dtype)  # bf16 1.0

    def free(self) -> None:
        gc.collect()
        if self.gpu:
            self.xp.get_default_memory_pool().free_all_blocks()

    def describe(self) -> dict[str, Any]:
        if not self.gpu:
            return {"device": platform.processor() or platform.machine(), "backend": "numpy"}
        cp = self.xp
        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
        name = props["name"]
        return {
            "device": name.decode() if isinstance(name, bytes) else str(name),
            "memory_bytes": int(props["totalGlobalMem"]),
            "sms": int(props["multiProcessorCount"]),
            "cupy": cp.__version__,
            "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(),
            "backend": "cupy",
        }


def make_ops(dev: Device) -> Ops:
    """The backend's ops, taking weights that already live on the device as they are."""
    if not dev.gpu:
        from pdserve.backends.numpy_ops import NumpyOps

        return NumpyOps()
    from pdserve.backends.cupy_ops import CupyLinear, CupyOps

    class DeviceWeightOps(CupyOps):
        def weight(self, host: Any, fp32: bool = False) -> Any:
            return host if isinstance(host, dev.xp.ndarray) else super().weight(host, fp32)

        def linear_weight(self, host: Any, quantization: str | None) -> Any:
            if isinstance(host, dev.xp.ndarray) and quantization is None:
                return CupyLinear(host)
            return super().linear_weight(host, quantization)

    return DeviceWeightOps()


def random_weights(dev: Device, c: ModelConfig) -> ModelWeights:
    h = c.hidden_size

    def mlp(inter: int) -> MLPWeights:
        return MLPWeights(gate_up=dev.randn((2 * inter, h), STD), down=dev.randn((h, inter), STD))

    layers = []
    for i in range(c.num_hidden_layers):
        e, inter = c.moe_num_experts, c.moe_intermediate_size
        ffn: MLPWeights | MoEWeights
        if c.is_moe_layer(i):
            shared = mlp(c.shared_intermediate_size) if c.moe_num_shared_experts else None
            ffn = MoEWeights(router=dev.randn((e, h), STD, fp32=True),
                             correction_bias=dev.xp.zeros(e, np.float32),
                             gate_up=dev.randn((e, 2 * inter, h), STD),
                             down=dev.randn((e, h, inter), STD), shared=shared)  # fmt: skip
        else:
            ffn = mlp(c.intermediate_size)
        qkv = dev.randn((c.q_size + 2 * c.kv_size, h), STD)
        layers.append(
            LayerWeights(
                input_norm=dev.ones(h),
                post_attention_norm=dev.ones(h),
                qkv=qkv,
                o=dev.randn((h, c.q_size), STD),
                mlp=ffn,
            )
        )
    embed = dev.randn((c.vocab_size, h), STD)
    lm_head = embed if c.tie_word_embeddings else dev.randn((c.vocab_size, h), STD)
    return ModelWeights(embed=embed, layers=layers, norm=dev.ones(h), lm_head=lm_head)


# -- floors -------------------------------------------------------------------------------------
def measure_ceilings(dev: Device, ops: Ops, copy_bytes: int, n: int) -> dict:
    """Device copy bandwidth (read + write) and the bf16 GEMM rate through `ops.linear`."""

    def device_ms(fn: Callable[[], object], warmup: int = 3, repeat: int = 10) -> float:
        for _ in range(warmup):
            fn()
        runs = []
        for _ in range(repeat):
            a, b = dev.event(), dev.event()
            a.record()
            fn()
            b.record()
            dev.sync()
            runs.append(dev.elapsed_ms(a, b))
        return statistics.median(runs)

    src = dev.randn((copy_bytes // 2,))
    copy_bytes = src.nbytes
    src = src.view(np.uint16)  # a plain copy, whatever CuPy thinks of bf16
    dst = dev.xp.empty_like(src)
    copy_ms = device_ms(lambda: dev.xp.copyto(dst, src))
    x, w = dev.randn((n, n)), ops.linear_weight(dev.randn((n, n)), None)
    gemm_ms = device_ms(lambda: ops.linear(x, w))
    return {
        "copy_bytes": copy_bytes,
        "copy_ms": copy_ms,
        "copy_bytes_per_s": 2 * copy_bytes / (copy_ms / 1e3),
        "gemm_n": n,
        "gemm_ms": gemm_ms,
        "gemm_flops_per_s": 2 * n**3 / (gemm_ms / 1e3),
    }


# -- profile ------------------------------------------------------------------------------------
