"""Weight-only quantization at load (`--quantization wint8|wint4|block_wise_fp8`), FastDeploy's
names.

wint8 / wint4: symmetric, per output channel: w ~= q * scale with q in [-127, 127] or [-7, 7]
(two 4-bit values packed per byte). block_wise_fp8: 128 x 128 blocks, each scaled so its largest
magnitude is 448 and stored as float8 e4m3fn codes (1 sign, 4 exponent bits with bias 7, 3 mantissa
bits, subnormals, no infinities), the layout FastDeploy and DeepSeek use. Activations stay in the
backend's float type; a linear dequantizes its weight where it is used. The NumPy backend is the
reference for the GPU kernels to come.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

METHODS = ("wint8", "wint4", "block_wise_fp8")
_QMAX = {"wint8": 127, "wint4": 7}
FP8_BLOCK = 128  # rows and columns per fp8 scale
FP8_MAX = 448.0  # largest finite e4m3fn value


def _e4m3_table() -> np.ndarray:
    """The float32 value of every e4m3fn code (0x7F and 0xFF are NaN and never produced)."""
    c = np.arange(256)
    sign = np.where(c >> 7, -1.0, 1.0)
    exp, mant = (c >> 3) & 15, c & 7
    val = np.where(exp == 0, mant * 2.0**-9, (1 + mant / 8) * 2.0 ** (exp - 7.0))
    return (sign * val).astype(np.float32)


_E4M3 = _e4m3_table()


@dataclass(frozen=True)
class QuantizedWeight:
    """A linear weight [..., out, in] as integers and a float32 scale per output channel."""

    method: str
    # int8 [..., out, in]; wint4: uint8 [..., out, in / 2], low nibble first; fp8: uint8 codes
    q: np.ndarray
    scale: np.ndarray  # float32 [..., out]; fp8: [..., out / 128, in / 128] (rounded up)
    in_features: int
    # fp8 only, once rows or columns were taken out (a tensor-parallel shard): the scale block
    # of each remaining row [out] and column [in]; None means row // 128, column // 128
    row_block: np.ndarray | None = None
    col_block: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        if self.method == "block_wise_fp8":
            return self.q.shape
        return (*self.scale.shape, self.in_features)

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes

    def __getitem__(self, i: int) -> QuantizedWeight:
        """One matrix of a stack (an expert of [E, out, in])."""
        return replace(self, q=self.q[i], scale=self.scale[i])

    def take(self, index: np.ndarray, axis: int) -> QuantizedWeight:
        """Rows (axis -2) or columns (axis -1) `index` of the matrices, codes and scales kept as
        they are: a shard dequantizes to exactly the same values as in the whole weight."""
        index = np.asarray(index, dtype=np.int64)
        if axis not in (-1, -2):
            raise ValueError("take rows (axis -2) or columns (axis -1)")
        if self.method == "block_wise_fp8":
            rows, cols = self._blocks()
            if axis == -2:
                return replace(self, q=self.q[..., index, :], row_block=rows[index],
                               col_block=cols)  # fmt: skip
            return replace(self, q=self.q[..., index], in_features=index.size, row_block=rows,
                           col_block=cols[index])  # fmt: skip
        if axis == -2:
            return replace(self, q=self.q[..., index, :], scale=self.scale[..., index])
        if self.method == "wint4":
            return replace(self, q=_pack4(_unpack4(self.q, self.in_features)[..., index]),
                           in_features=index.size)  # fmt: skip
        return replace(self, q=self.q[..., index], in_features=index.size)

    def _blocks(self) -> tuple[np.ndarray, np.ndarray]:
        out, n = self.q.shape[-2:]
        rows = np.arange(out) // FP8_BLOCK if self.row_block is None else self.row_block
        cols = np.arange(n) // FP8_BLOCK if self.col_block is None else self.col_block
        return rows, cols

    def dequantize(self) -> np.ndarray:
        if self.method == "block_wise_fp8":
            rows, cols = self._blocks()
            return _E4M3[self.q] * self.scale[..., rows[:, None], cols[None, :]]
        q = _unpack4(self.q, self.in_features) if self.method == "wint4" else self.q
        return q.astype(np.float32) * self.scale[..., None]


def quantize(w: np.ndarray, method: str) -> QuantizedWeight:
    """Quantize a float weight [..., out, in]; ValueError for an unknown method."""
    if method not in METHODS:
        raise ValueError(f"--quantization {method!r}: choose one of {', '.join(METHODS)}")
    w = np.asarray(w, dtype=np.float32)
    if method == "block_wise_fp8":
        return _quantize_fp8(w)
    qmax = _QMAX[method]
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


def _quantize_fp8(w: np.ndarray) -> QuantizedWeight:
    *lead, out, n = w.shape
    ob, ib = -(-out // FP8_BLOCK), -(-n // FP8_BLOCK)
    padded = np.zeros((*lead, ob * FP8_BLOCK, ib * FP8_BLOCK), np.float32)
    padded[..., :out, :n] = w
    blocks = padded.reshape(*lead, ob, FP8_BLOCK, ib, FP8_BLOCK)
    amax = np.abs(blocks).max(axis=(-3, -1))  # [..., ob, ib]
    scale = np.where(amax > 0, amax / FP8_MAX, 1.0).astype(np.float32)
    full = scale.repeat(FP8_BLOCK, axis=-2).repeat(FP8_BLOCK, axis=-1)[..., :out, :n]
    return QuantizedWeight("block_wise_fp8", _e4m3_encode(w / full), scale, n)


def _e4m3_encode(x: np.ndarray) -> np.ndarray:
    """Round to the nearest e4m3fn value (ties to even), as uint8 codes; |x| <= 448."""
    a = np.minimum(np.abs(x), FP8_MAX)
    with np.errstate(divide="ignore"):
        e = np.floor(np.log2(np.maximum(a, 2.0**-10)))
    e = np.maximum(e, -6)  # below 2^-6: subnormals, steps of 2^-9
    r = np.minimum(np.rint(a / 2.0 ** (e - 3)) * 2.0 ** (e - 3), FP8_MAX)
    normal = r >= 2.0**-6
    with np.errstate(divide="ignore"):
        e2 = np.floor(np.log2(np.maximum(r, 2.0**-10)))
    exp = np.where(normal, e2 + 7, 0)
    mant = np.where(normal, r / 2.0**e2 * 8 - 8, r / 2.0**-9)
    code = (exp.astype(np.uint8) << 3) | mant.astype(np.uint8)
    return np.where(x < 0, code | 0x80, code).astype(np.uint8)
