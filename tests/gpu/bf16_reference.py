"""The NumPy backend with the cupy backend's rounding points: a reference that differs from the
GPU only by float32 summation order, where plain NumPy differs by bf16 rounding too."""

from __future__ import annotations

import numpy as np

from pdserve.backends.numpy_ops import NumpyOps
from pdserve.model.forward_batch import ForwardBatch


def round_bf16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bf16 (ties to even), still as float32."""
    u = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return u.astype(np.uint32).view(np.float32)


def bf16_randn(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    """Standard normal float32 data that is bf16-exact, so every backend sees the same values."""
    return round_bf16(scale * rng.standard_normal(shape).astype(np.float32))


def assert_bf16_close(got: np.ndarray, want: np.ndarray, rel: float = 1e-2) -> None:
    """Every element written, and within bf16 rounding of the reference."""
    got = np.asarray(got, dtype=np.float32)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.isfinite(got).all(), f"{np.count_nonzero(~np.isfinite(got))} elements not written"
    err = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)
    assert err <= rel, f"relative error {err:.3g} > {rel}"
    worst = np.abs(got - want).max()
    assert worst <= 4 * rel * np.abs(want).max(), f"max abs error {worst:.3g}"


class _LinearWeight(np.ndarray):
    """A weight made by `linear_weight`: what a linear over it returns is rounded to bf16 (the
    lm_head, a plain `weight`, gives float32 logits)."""


class Bf16ReferenceOps(NumpyOps):
    """bf16 weights; every op's output rounded to bf16 where the GPU stores bf16; the residual
    stream, router and logits float32; the experts' SiLU-mul output rounded before `down`."""

    name = "numpy-bf16"

    def weight(self, host: np.ndarray, fp32: bool = False) -> np.ndarray:
        w = super().weight(host)
        return w if fp32 else round_bf16(w)

    def linear_weight(self, host: np.ndarray, quantization: str | None) -> np.ndarray:
        return round_bf16(super().weight(host)).view(_LinearWeight)

    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        return round_bf16(super().rms_norm(x, weight, eps))

    def add_rms_norm(
        self, x: np.ndarray, residual: np.ndarray, weight: np.ndarray, eps: float
    ) -> tuple[np.ndarray, np.ndarray]:
        residual = residual + round_bf16(x)  # the model's experts + shared sum is bf16 on GPU
        return self.rms_norm(residual, weight, eps), residual

    def linear(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        y = np.asarray(x) @ np.asarray(weight).T
        return round_bf16(y) if isinstance(weight, _LinearWeight) else y

    def rope(self, x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
        return round_bf16(super().rope(x, positions, theta))

    def paged_attention(
        self, q: np.ndarray, kv_layer: np.ndarray, batch: ForwardBatch, scale: float
    ) -> np.ndarray:
        return round_bf16(super().paged_attention(q, kv_layer, batch, scale))

    def silu_mul(self, gate_up: np.ndarray) -> np.ndarray:
        return round_bf16(super().silu_mul(np.asarray(gate_up)))

    def moe_experts(
        self,
        x: np.ndarray,
        weights: np.ndarray,
        ids: np.ndarray,
        gate_up: np.ndarray,
        down: np.ndarray,
        shared: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> np.ndarray:
        """In float32 until one bf16 rounding at the end, the shared experts (their SiLU-mul
        rounded, as on the GPU) included."""
        gate_up, down = np.asarray(gate_up), np.asarray(down)
        out = np.zeros(x.shape, np.float32)
        if shared is not None:
            out += self.silu_mul(x @ np.asarray(shared[0]).T) @ np.asarray(shared[1]).T
        for t in range(x.shape[0]):
            for k, e in enumerate(ids[t]):
                act = self.silu_mul(x[t : t + 1] @ gate_up[e].T)  # [1, I], bf16 as on the GPU
                out[t] += weights[t, k] * (act @ down[e].T)[0]
        return round_bf16(out)
