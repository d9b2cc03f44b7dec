"""The KV transfer's GPU side: moving a pool's blocks on a side stream, to another GPU pool
(CUDA IPC) or to pinned host memory (ZeroMQ), ordered after the compute that wrote them.

Importable without CuPy: it is imported only when a pool is a CuPy array. A pool here is
C-contiguous `[layers, 2, blocks, block_size, kv_heads, head_dim]`, so one layer's K (or V) of
a run of consecutive blocks is one contiguous range and each run moves with one memcpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# cudaMemcpyKind: Default lets unified addressing find both sides (this GPU, a peer GPU's
# IPC mapping, pinned host memory)
_MEMCPY_DEFAULT = 4
# a memcpy call costs ~10 us of host time (measured on the H200: 7168 calls for an 8k-token
# prompt's scattered blocks took 70 ms); past this many runs of blocks per layer, one gather
# and one scatter kernel move them instead (more device bytes, a fixed host cost)
MAX_MEMCPY_RUNS = 8


def is_device_array(x: object) -> bool:
    """Whether `x` is a CuPy array (without importing CuPy on machines that lack it)."""
    return type(x).__module__.startswith("cupy")


def kv_dtype(name: str) -> np.dtype:
    """The numpy dtype of a KV dtype name, bfloat16 included (ml_dtypes' type)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _bits(a: Any) -> Any:
    """A 2-byte float array as uint16 words: CuPy copies and indexes those, not bf16."""
    return a.view(np.uint16) if a.dtype.itemsize == 2 and a.dtype.kind != "u" else a


def host_blocks(layer_kv: Any, block_ids: Sequence[int]) -> np.ndarray:
    """Blocks `block_ids` of one layer [2, blocks, block_size, kv_heads, head_dim] as a host
    array [2, n, ...] (what a ZeroMQ payload holds); waits for the device."""
    if not is_device_array(layer_kv):
        return np.take(layer_kv, list(block_ids), axis=1)
    import cupy as cp

    ids = cp.asarray(np.asarray(block_ids, dtype=np.int64))
    return cp.asnumpy(_bits(layer_kv)[:, ids]).view(layer_kv.dtype)


def scatter_blocks(layer_kv: Any, block_ids: Sequence[int], payload: np.ndarray) -> None:
    """layer_kv[:, block_ids] = payload [2, n, block_size, kv_heads, head_dim] (host). Into a
    GPU pool it waits until the bytes are there, so that the transfer's ack (and so the first
    read of these blocks) comes after them whatever stream the model computes on."""
    if not is_device_array(layer_kv):
        layer_kv[:, np.asarray(block_ids, dtype=np.int64)] = payload
        return
    import cupy as cp

    ids = cp.asarray(np.asarray(block_ids, dtype=np.int64))
    _bits(layer_kv)[:, ids] = cp.asarray(_bits(payload))
    cp.cuda.get_current_stream().synchronize()


def flip_device_byte(block: Any) -> None:
    """Invert the first byte of a device array in place and wait (fault injection only)."""
    import cupy as cp

    flat = block.reshape(-1).view(np.uint8)
    flat[:1] ^= np.uint8(0xFF)
    cp.cuda.get_current_stream().synchronize()


def _block_addr(pool: Any, layer: int, kv: int, block: int) -> int:
    """Device address of pool[layer, kv, block] of a C-contiguous pool."""
    layers, _, blocks = pool.shape[:3]
    block_bytes = pool.nbytes // max(1, layers * 2 * blocks)
    return pool.data.ptr + ((layer * 2 + kv) * blocks + block) * block_bytes


class DeviceStager:
    """A side stream for one sender's device work. Each `after_compute()` orders what follows
    after everything already launched on the current (compute) stream; `record()` gives an
    event whose `.done` says the work before it finished, without ever waiting."""

    def __init__(self) -> None:
        import cupy as cp

        self._cp = cp
        self.stream = cp.cuda.Stream(non_blocking=True)

    def after_compute(self) -> None:
        cp = self._cp
        ready = cp.cuda.Event(disable_timing=True)
        ready.record(cp.cuda.get_current_stream())
        self.stream.wait_event(ready)

    def copy_runs(
        self, dst: Any, src: Any, layer: int, runs: Sequence[tuple[int, int, int]]
    ) -> None:
        """dst[layer, :, d : d + n] = src[layer, :, s : s + n] for each run (s, d, n); pools of
        the same layout and dtype whose numbers of blocks may differ."""
        _check_pool(src)
        _check_pool(dst)
        if len(runs) > MAX_MEMCPY_RUNS:
            cp = self._cp
            with self.stream:
                src_ids = cp.asarray(_expand(runs, 0))
                dst_ids = cp.asarray(_expand(runs, 1))
                _bits(dst[layer])[:, dst_ids] = _bits(src[layer])[:, src_ids]
            return
        block_bytes = src[0, 0, 0].nbytes
        memcpy = self._cp.cuda.runtime.memcpyAsync
        for s, d, n in runs:
            for kv in (0, 1):
                memcpy(_block_addr(dst, layer, kv, d), _block_addr(src, layer, kv, s),
                       n * block_bytes, _MEMCPY_DEFAULT, self.stream.ptr)  # fmt: skip

    def to_host(self, src: Any, layer: int, block_ids: Sequence[int]) -> np.ndarray:
        """Pinned host array [2, n, block_size, kv_heads, head_dim] that will hold blocks
        `block_ids` of layer `layer` once the next recorded event is done."""
        _check_pool(src)
        import cupyx

        n = len(block_ids)
        out = cupyx.empty_pinned((2, n, *src.shape[3:]), dtype=src.dtype)
        block_bytes = src[0, 0, 0].nbytes
        memcpy = self._cp.cuda.runtime.memcpyAsync
        runs = _runs_of(block_ids)
        if len(runs) > MAX_MEMCPY_RUNS:  # gather on the device, then one copy
            with self.stream:
                ids = self._cp.asarray(np.asarray(block_ids, dtype=np.int64))
                packed = _bits(src[layer])[:, ids]  # [2, n, block_size, kv_heads, head_dim]
            # the pool reuses `packed` only for later work on this stream: after the copy
            memcpy(out.ctypes.data, packed.data.ptr, packed.nbytes, _MEMCPY_DEFAULT,
                   self.stream.ptr)  # fmt: skip
            return out
        for kv in (0, 1):
            base = out.ctypes.data + kv * n * block_bytes
            for s, j, run in runs:
                memcpy(base + j * block_bytes, _block_addr(src, layer, kv, s), run * block_bytes,
                       _MEMCPY_DEFAULT, self.stream.ptr)  # fmt: skip
        return out

    def record(self) -> Any:
        """An event marking the side stream's work so far."""
        event = self._cp.cuda.Event(disable_timing=True)
        event.record(self.stream)
        return event

    def synchronize(self) -> None:
        self.stream.synchronize()


def _expand(runs: Sequence[tuple[int, int, int]], side: int) -> np.ndarray:
    """The block ids of one side (0: source, 1: destination) of (src, dst, length) runs."""
    return np.concatenate([np.arange(r[side], r[side] + r[2]) for r in runs]).astype(np.int64)


def _runs_of(block_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """(first block, index in block_ids, length) of each run of consecutive block ids."""
    runs: list[tuple[int, int, int]] = []
    for j, b in enumerate(block_ids):
        if runs and b == runs[-1][0] + runs[-1][2]:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((b, j, 1))
    return runs


def _check_pool(pool: Any) -> None:
    if pool.ndim != 6 or pool.shape[1] != 2 or not pool.flags.c_contiguous:
        raise ValueError(f"a KV pool must be C-contiguous [layers, 2, blocks, ...], got "
                         f"{tuple(pool.shape)}")  # fmt: skip
