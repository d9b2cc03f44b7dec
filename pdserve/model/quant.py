"""Weight-only quantization at load (`--quantization wint8|wint4`), FastDeploy's names.

Symmetric, per output channel: w ~= q * scale with q in [-127, 127] (wint8) or [-7, 7] (wint4,
two values packed per byte). Activations stay in the backend's float type; a linear dequantizes
its weight where it is used. The NumPy backend is the reference for the GPU kernels to come.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METHODS = ("wint8", "wint4")
_QMAX = {"wint8": 127, "wint4": 7}


@dataclass(frozen=True)
class QuantizedWeight:
    """A linear weight [..., out, in] as integers and a float32 scale per output channel."""

    method: str
    q: np.ndarray  # int8 [..., out, in], or uint8 [..., out, in / 2] (wint4: low nibble first)
    scale: np.ndarray  # float32 [..., out]
    in_features: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.scale.shape, self.in_features)

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes

    def __getitem__(self, i: int) -> QuantizedWeight:
        """One matrix of a stack (an expert of [E, out, in])."""
        return QuantizedWeight(self.method, self.q[i], self.scale[i], self.in_features)

    def dequantize(self) -> np.ndarray:
        q = _unpack4(self.q, self.in_features) if self.method == "wint4" else self.q
        return q.astype(np.float32) * self.scale[..., None]


def quantize(w: np.ndarray, method: str) -> QuantizedWeight:
    """Quantize a float weight [..., out, in]; ValueError for an unknown method."""
    if method not in METHODS:
        raise ValueError(f"--quantization {method!r}: choose one of {', '.join(METHODS)}")
    qmax = _QMAX[method]
    w = np.asarray(w, dtype=np.float32)
    amax = np.abs(w).max(axis=-1)  # [..., out]
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale[..., None]), -qmax, qmax).astype(np.int8)
    if method == "wint4":
        q = _pack4(q)
    return QuantizedWeight(method, q, scale, w.shape[-1])


def _pack4(q: np.ndarray) -> np.ndarray:
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros((*q.shape[:-1], 1), np.int8)], axis=-1)
    u = (q + 8).astype(np.uint8)  # [-7, 7] -> [1, 15]
    return u[..., 0::2] | (u[..., 1::2] << 4)


def _unpack4(p: np.ndarray, n: int) -> np.ndarray:
    out = np.empty((*p.shape[:-1], p.shape[-1] * 2), np.int8)
    out[..., 0::2] = (p & 0x0F).astype(np.int8) - 8
    out[..., 1::2] = (p >> 4).astype(np.int8) - 8
    return out[..., :n]
