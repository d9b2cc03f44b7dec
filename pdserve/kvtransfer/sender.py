"""The prefill side of a KV transfer: pushes layers into blocks a decode rank allocated.

One DEALER per destination endpoint, kept across transfers. Over ZeroMQ a layer's blocks are
gathered into one contiguous array and sent zero-copy after its header; in one host, when the
destination's pool is reachable shared memory, the blocks are copied straight into it and only
a `KVLayerIPC` header follows. `KVDone` closes a transfer; the receiver's `KVAck` says whether
every byte landed. Sends never wait longer than `send_timeout_s`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import zmq

from pdserve.kvtransfer.faults import FaultInjector
from pdserve.kvtransfer.schema import (
    KVAck,
    KVDone,
    KVLayer,
    KVLayerIPC,
    SchemaError,
    blocks_checksum,
    checksum,
    decode,
    encode,
)
from pdserve.kvtransfer.shm_pool import SharedKVPool

log = logging.getLogger(__name__)


class KVTransferError(RuntimeError):
    """The destination could not take a frame within the send timeout; the transfer is gone."""


@dataclass(frozen=True)
class Destination:
    """Where one transfer's KV goes: a decode rank's endpoint and the blocks it allocated."""

    zmq_endpoint: str  # e.g. tcp://10.0.0.2:8003 (cache-queue-port + rank)
    block_ids: list[int]  # destination block ids, in the order of the prompt's blocks
    shm_name: str | None = None  # the destination pool's shared memory, when in this host
    shm_shape: tuple[int, ...] | None = None  # [layers, 2, blocks, block_size, kv_heads, head_dim]
    shm_dtype: str = "float32"  # numpy dtype name of the destination pool
    checksum: bool = False  # crc32 every layer frame (--kv-checksum)
    use_ipc: bool = False  # copy through shared memory (falls back to ZeroMQ if unreachable)


@dataclass
class _Transfer:
    dest: Destination
    sock: zmq.Socket
    pool: SharedKVPool | None
    deadline: float | None  # time.monotonic() seconds by which the ack must come


class KVSender:
    """Sends transfers to any number of receivers from one engine loop; see the module doc."""

    def __init__(
        self,
        ctx: zmq.Context,
        send_timeout_s: float = 5.0,
        max_frame_bytes: int = 16 << 20,
        sndhwm: int = 1024,
        linger_ms: int = 1000,
    ) -> None:
        self.ctx = ctx
        self.send_timeout_s = send_timeout_s
        # payload bytes per frame; larger layers go in pieces. Below glibc's 32 MiB mmap
        # threshold cap, so both ends reuse heap buffers instead of faulting fresh pages in
        # for every frame (loopback ran 2.8x faster at 16 MiB than at 64 MiB)
        self.max_frame_bytes = max_frame_bytes
        self._sndhwm = sndhwm  # messages queued per endpoint before a send waits
        self._linger_ms = linger_ms
        self._sockets: dict[str, zmq.Socket] = {}
        self._pools: dict[str, SharedKVPool] = {}
        self._transfers: dict[str, _Transfer] = {}
        self.faults = FaultInjector.from_env()
        self.bytes_sent = 0  # KV bytes sent or copied into shared memory, cumulative
        self.ipc_fallbacks = 0  # transfers that asked for ipc but went over ZeroMQ

    def start(self, transfer_id: str, dest: Destination, timeout_s: float | None = None) -> str:
        """Open a transfer; the transport it will use ("ipc" or "zmq"). `poll_acks` reports a
        failed ack for it if none came `timeout_s` seconds from now. The first transfer to a
        shared-memory pool attaches and prefaults it (~0.1 s per GB, once per pool)."""
        if transfer_id in self._transfers:
            raise ValueError(f"transfer {transfer_id} is already in progress")
        if len(set(dest.block_ids)) != len(dest.block_ids) or any(b < 0 for b in dest.block_ids):
            raise ValueError(f"destination block ids must be distinct and >= 0: {dest.block_ids}")
        pool = self._attach(dest) if dest.use_ipc else None
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._transfers[transfer_id] = _Transfer(
            dest, self._socket(dest.zmq_endpoint), pool, deadline
        )
        return "zmq" if pool is None else "ipc"

    def send_layer(
        self,
        transfer_id: str,
        layer: int,
        kv_cache: np.ndarray,
        src_block_ids: Sequence[int],
        dst_offset: int = 0,
    ) -> int:
        """Send layer `layer` of source blocks `src_block_ids` of `kv_cache` [layers, 2, blocks,
        block_size, kv_heads, head_dim] to destination blocks
        `dest.block_ids[dst_offset : dst_offset + len(src_block_ids)]`; the bytes sent."""
        t = self._get(transfer_id)
        src = np.asarray(src_block_ids, dtype=np.int64).reshape(-1)
        if dst_offset < 0 or dst_offset + src.size > len(t.dest.block_ids):
            raise ValueError(
                f"{src.size} blocks at dst_offset {dst_offset} overrun the "
                f"{len(t.dest.block_ids)} destination blocks"
            )
        if not 0 <= layer < kv_cache.shape[0]:
            raise ValueError(f"layer {layer} outside the pool's {kv_cache.shape[0]} layers")
        if src.size and (src.min() < 0 or src.max() >= kv_cache.shape[2]):
            raise ValueError(f"source blocks {src.tolist()} outside the pool's {kv_cache.shape[2]}")
        dst = t.dest.block_ids[dst_offset : dst_offset + src.size]
        if src.size == 0:
            return 0
        if t.pool is not None:
            self._check_pool(t.pool.array, kv_cache, layer, dst)
            return self._copy_ipc(transfer_id, t, layer, kv_cache, src.tolist(), dst)
        step = max(1, self.max_frame_bytes // max(1, kv_cache[layer, :, 0].nbytes))
        sent = 0
        for i in range(0, src.size, step):
            s, d = src[i : i + step], dst[i : i + step]
            sent += self._send_zmq(transfer_id, t, layer, kv_cache, s, d)
        return sent

    def finish(self, transfer_id: str, num_layers: int, num_blocks: int) -> None:
        """Say every layer is sent: `num_layers` layers of `num_blocks` destination blocks in
        all (what the receiver expects). The ack comes through `poll_acks`."""
        t = self._get(transfer_id)
        done = KVDone(transfer_id=transfer_id, num_layers=num_layers, num_blocks=num_blocks)
        self._send(transfer_id, t, [encode(done)])

    def poll_acks(self) -> list[KVAck]:
        """Acks of this sender's transfers that arrived, without blocking; each ends its
        transfer. A transfer past its timeout ends with a failed ack made here."""
        acks: list[KVAck] = []
        for endpoint, sock in self._sockets.items():
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    ack = decode(frames[0]) if len(frames) == 1 else None
                except SchemaError as e:
                    ack = None
                    log.warning("bad frame from KV receiver %s: %s", endpoint, e)
                if not isinstance(ack, KVAck):
                    log.warning("KV receiver %s sent something other than a KVAck", endpoint)
                elif self._transfers.pop(ack.transfer_id, None) is not None:
                    acks.append(ack)
        now = time.monotonic()
        for tid, t in list(self._transfers.items()):
            if t.deadline is not None and now > t.deadline:
                del self._transfers[tid]
                acks.append(KVAck(transfer_id=tid, ok=False, error="no ack before the timeout"))
        return acks

    def abort(self, transfer_id: str) -> bool:
        """Forget a transfer (frames already queued still go); whether it was in progress."""
        return self._transfers.pop(transfer_id, None) is not None

    @property
    def in_progress(self) -> list[str]:
        return list(self._transfers)

    def close(self) -> None:
        """Close the sockets (each waits up to linger_ms for queued frames) and pools."""
        for sock in self._sockets.values():
            sock.close()
        for pool in self._pools.values():
            pool.close()
        self._sockets.clear()
        self._pools.clear()
        self._transfers.clear()

    def _send_zmq(
        self, tid: str, t: _Transfer, layer: int, kv: np.ndarray, src: np.ndarray, dst: list[int]
    ) -> int:
        chunk = np.take(kv[layer], src, axis=1)  # [2, n, block_size, kv_heads, head_dim]
        fate = self.faults.next() if self.faults is not None else "send"
        if fate == "drop":
            return 0
        crc = checksum(chunk) if t.dest.checksum else None
        if fate == "corrupt":
            self.faults.flip_byte(chunk)
        header = KVLayer(
            transfer_id=tid,
            layer=layer,
            block_ids=list(dst),
            checksum=crc,
            dtype=kv.dtype.name,
            shape=list(chunk.shape),
        )
        # zero-copy: ZeroMQ keeps `chunk` alive until it is on the wire
        self._send(tid, t, [encode(header), chunk.reshape(-1).view(np.uint8)])
        self.bytes_sent += chunk.nbytes
        return chunk.nbytes

    def _copy_ipc(
        self, tid: str, t: _Transfer, layer: int, kv: np.ndarray, src: list[int], dst: list[int]
    ) -> int:
        """Copy block runs straight into the destination pool (no staging copy), then say so."""
        fate = self.faults.next() if self.faults is not None else "send"
        if fate == "drop":
            return 0
        out, inp = t.pool.array[layer], kv[layer]  # [2, blocks, block_size, kv_heads, head_dim]
        for s, d, n in _runs(src, dst):
            out[:, d : d + n] = inp[:, s : s + n]
        crc = blocks_checksum(inp, src) if t.dest.checksum else None
        if fate == "corrupt":
            self.faults.flip_byte(out[0, dst[0]])
        header = KVLayerIPC(
            transfer_id=tid,
            layer=layer,
            block_ids=list(dst),
            checksum=crc,
            dtype=kv.dtype.name,
            shape=[2, len(src), *kv.shape[3:]],
            shm_name=t.dest.shm_name,
        )
        self._send(tid, t, [encode(header)])
        nbytes = len(src) * inp[:, 0].nbytes
        self.bytes_sent += nbytes
        return nbytes

    def _send(self, tid: str, t: _Transfer, frames: list) -> None:
        deadline = time.monotonic() + self.send_timeout_s
        while True:
            try:
                t.sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
                return
            except zmq.Again:
                left_ms = int((deadline - time.monotonic()) * 1000)
                if left_ms <= 0 or not t.sock.poll(left_ms, zmq.POLLOUT):
                    self._transfers.pop(tid, None)
                    raise KVTransferError(
                        f"KV transfer {tid}: {t.dest.zmq_endpoint} took no "
                        f"frame for {self.send_timeout_s}s"
                    ) from None

    def _get(self, transfer_id: str) -> _Transfer:
        t = self._transfers.get(transfer_id)
        if t is None:
            raise ValueError(
                f"transfer {transfer_id} is not in progress (never started, "
                f"acked, timed out or aborted)"
            )
        return t

    def _socket(self, endpoint: str) -> zmq.Socket:
        sock = self._sockets.get(endpoint)
        if sock is None:
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.SNDHWM, self._sndhwm)
            sock.setsockopt(zmq.LINGER, self._linger_ms)
            sock.setsockopt(zmq.IMMEDIATE, 1)  # no queueing toward a peer that is not there
            try:
                sock.connect(endpoint)
            except zmq.ZMQError as e:
                sock.close(linger=0)
                raise ValueError(f"KV endpoint {endpoint!r}: {e}") from None
            self._sockets[endpoint] = sock
        return sock

    def _attach(self, dest: Destination) -> SharedKVPool | None:
        if dest.shm_name is None or dest.shm_shape is None:
            raise ValueError("use_ipc needs the destination's shm_name and shm_shape")
        pool = self._pools.get(dest.shm_name)
        stale = pool is not None and (
            not pool.is_current() or pool.array.shape != tuple(dest.shm_shape)
        )  # the receiver restarted and made a new segment of that name
        if stale:
            self._pools.pop(dest.shm_name).close()
            pool = None
        if pool is None:
            try:
                pool = SharedKVPool.attach(dest.shm_name, dest.shm_shape, dest.shm_dtype)
            except (OSError, ValueError) as e:
                self.ipc_fallbacks += 1
                log.warning("cannot attach KV pool %s (%s); sending over ZeroMQ", dest.shm_name, e)
                return None
            pool.prefault()
            self._pools[dest.shm_name] = pool
        return pool

    @staticmethod
    def _check_pool(pool: np.ndarray, kv: np.ndarray, layer: int, dst: list[int]) -> None:
        if pool.dtype != kv.dtype or pool.shape[3:] != kv.shape[3:] or layer >= pool.shape[0]:
            raise ValueError(
                f"destination pool {pool.shape} {pool.dtype} cannot take layer "
                f"{layer} of {kv.shape} {kv.dtype}"
            )
        if dst and max(dst) >= pool.shape[2]:
            raise ValueError(f"destination blocks {dst} outside the pool's {pool.shape[2]}")


def _runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """(src start, dst start, length) of the longest runs where both block ids go up by one."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst):
        if runs and s == runs[-1][0] + runs[-1][2] and d == runs[-1][1] + runs[-1][2]:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs
