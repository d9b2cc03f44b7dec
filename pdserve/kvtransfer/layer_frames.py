"""How one layer's blocks become a KV sender's frames, for each pool kind and transport.

- `gather_host` / `copy_host`: a NumPy pool, over ZeroMQ (a gathered payload) or into an
  attached shared-memory pool; the bytes are in place when the call returns.
- `gather_device` / `copy_device`: a GPU pool, into pinned host memory (ZeroMQ) or another GPU
  pool (CUDA IPC), on the `DeviceStager`'s side stream; the frames carry the event the sender
  waits on (by polling) before it may send them.
Each returns a `Frames`, or None when fault injection drops the layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pdserve.kvtransfer.device_copy import DeviceStager, flip_device_byte
from pdserve.kvtransfer.faults import FaultInjector
from pdserve.kvtransfer.schema import KVLayer, KVLayerIPC, blocks_checksum, checksum, encode


@dataclass
class Frames:
    """One message of a transfer, ready once `event` (a CUDA event, or None) is done."""

    event: Any
    build: Callable[[], list]  # the frames, built when sent (a checksum needs the bytes there)
    nbytes: int  # KV bytes it carries or announces


class LayerFrames:
    def __init__(self, faults: FaultInjector | None) -> None:
        self.faults = faults
        self._stager: DeviceStager | None = None  # made on the first device copy

    @property
    def stager(self) -> DeviceStager:
        if self._stager is None:
            self._stager = DeviceStager()
        return self._stager

    def after_compute(self) -> None:
        """Order the next device copies after the kernels launched so far (the layer's)."""
        self.stager.after_compute()

    def settle(self) -> None:
        """Wait until no device copy is in flight."""
        if self._stager is not None:
            self._stager.synchronize()

    def _fate(self) -> str:
        return self.faults.next() if self.faults is not None else "send"

    def gather_host(
        self, tid: str, crc: bool, layer: int, kv: np.ndarray, src: list[int], dst: list[int]
    ) -> Frames | None:
        fate = self._fate()
        if fate == "drop":
            return None
        chunk = np.take(kv[layer], src, axis=1)  # [2, n, block_size, kv_heads, head_dim]
        value = checksum(chunk) if crc else None
        if fate == "corrupt":
            self.faults.flip_byte(chunk)
        header = _layer_header(tid, layer, kv, dst, value, chunk.shape)
        # zero-copy: ZeroMQ keeps `chunk` alive until it is on the wire
        return Frames(None, lambda: [header, chunk.reshape(-1).view(np.uint8)], chunk.nbytes)

    def gather_device(
        self, tid: str, crc: bool, layer: int, kv: Any, src: list[int], dst: list[int]
    ) -> Frames | None:
        fate = self._fate()
        if fate == "drop":
            return None
        stager = self.stager
        chunk = stager.to_host(kv, layer, src)  # pinned [2, n, block_size, kv_heads, head_dim]

        def build() -> list:
            value = checksum(chunk) if crc else None
            if fate == "corrupt":
                self.faults.flip_byte(chunk)
            header = _layer_header(tid, layer, kv, dst, value, chunk.shape)
            return [header, chunk.reshape(-1).view(np.uint8)]

        return Frames(stager.record(), build, chunk.nbytes)

    def copy_host(
        self, tid: str, crc: bool, pool: Any, layer: int, kv: np.ndarray, src: list[int],
        dst: list[int],
    ) -> Frames | None:  # fmt: skip
        """Block runs straight into the shared-memory pool (no staging copy)."""
        fate = self._fate()
        if fate == "drop":
            return None
        out, inp = pool.array[layer], kv[layer]  # [2, blocks, block_size, kv_heads, head_dim]
        for s, d, n in block_runs(src, dst):
            out[:, d : d + n] = inp[:, s : s + n]
        value = blocks_checksum(inp, src) if crc else None
        if fate == "corrupt":
            self.faults.flip_byte(out[0, dst[0]])
        header = _ipc_header(tid, pool.name, layer, kv, src, dst, value)
        return Frames(None, lambda: [header], len(src) * inp[:, 0].nbytes)

    def copy_device(
        self, tid: str, crc: bool, pool: Any, layer: int, kv: Any, src: list[int],
        dst: list[int],
    ) -> Frames | None:  # fmt: skip
        """Block runs device to device into the destination's GPU pool (CUDA IPC)."""
        fate = self._fate()
        if fate == "drop":
            return None
        stager, out = self.stager, pool.array
        stager.copy_runs(out, kv, layer, block_runs(src, dst))
        # the checksum covers the source's bytes, read back after the copy
        host = stager.to_host(kv, layer, src) if crc else None

        def build() -> list:
            if fate == "corrupt":
                flip_device_byte(out[layer, 0, dst[0]])
            value = checksum(host) if host is not None else None
            return [_ipc_header(tid, pool.name, layer, kv, src, dst, value)]

        return Frames(stager.record(), build, len(src) * kv[layer, :, 0].nbytes)


def _layer_header(
    tid: str, layer: int, kv: Any, dst: list[int], crc: int | None, shape: Sequence[int]
) -> bytes:
    return encode(KVLayer(transfer_id=tid, layer=layer, block_ids=list(dst), checksum=crc,
                          dtype=kv.dtype.name, shape=list(shape)))  # fmt: skip


def _ipc_header(
    tid: str, name: str, layer: int, kv: Any, src: list[int], dst: list[int], crc: int | None
) -> bytes:
    return encode(KVLayerIPC(transfer_id=tid, layer=layer, block_ids=list(dst), checksum=crc,
                             dtype=kv.dtype.name, shape=[2, len(src), *kv.shape[3:]],
                             shm_name=name))  # fmt: skip


def block_runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """(src start, dst start, length) of the longest runs where both block ids go up by one."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst):
        if runs and s == runs[-1][0] + runs[-1][2] and d == runs[-1][1] + runs[-1][2]:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs
