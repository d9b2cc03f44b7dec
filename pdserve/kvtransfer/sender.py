"""The prefill side of a KV transfer: pushes layers into blocks a decode rank allocated.

One DEALER per destination endpoint, kept across transfers. Over ZeroMQ a layer's blocks are
gathered into one contiguous array and sent zero-copy after its header; in one host, when the
destination's pool is reachable (shared memory for a NumPy pool, CUDA IPC for a GPU one), the
blocks are copied straight into it and only a `KVLayerIPC` header follows. `KVDone` closes a
transfer; the receiver's `KVAck` says whether every byte landed. Sends never wait longer than
`send_timeout_s`.

From a GPU pool every copy runs on a side stream after the layer's compute, and a frame waits
in its transfer's queue until the copy behind it is done (polled with events, never waited
for on the engine loop): a header, and so the `KVDone` and the ack, never overtakes its bytes.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from pdserve.kvtransfer.device_copy import is_device_array
from pdserve.kvtransfer.faults import FaultInjector
from pdserve.kvtransfer.layer_frames import Frames, LayerFrames
from pdserve.kvtransfer.pools import InHostPool, InHostPools
from pdserve.kvtransfer.schema import CudaIpcPool, KVAck, KVDone, SchemaError, decode, encode

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
    use_ipc: bool = False  # copy in-host (shared memory / CUDA IPC), else ZeroMQ; see pools.py
    cuda_ipc: CudaIpcPool | None = None  # the destination pool on its GPU, when in this host


@dataclass
class _Transfer:
    dest: Destination
    sock: zmq.Socket
    pool: InHostPool | None
    deadline: float | None  # time.monotonic() seconds by which the ack must come
    queue: deque[Frames] = field(default_factory=deque)  # frames waiting on device copies


class KVSender:
    """Sends transfers to any number of receivers from one engine loop; see the module doc.
    `device`: the pools sent from are CuPy arrays (only CUDA IPC reaches in-host then)."""

    def __init__(
        self,
        ctx: zmq.Context,
        send_timeout_s: float = 5.0,
        max_frame_bytes: int = 16 << 20,
        sndhwm: int = 1024,
        linger_ms: int = 1000,
        device: bool = False,
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
        self.faults = FaultInjector.from_env()
        self._layers = LayerFrames(self.faults)
        self._pools = InHostPools(device, self._settle)
        self._transfers: dict[str, _Transfer] = {}
        self.bytes_sent = 0  # KV bytes sent or copied into an in-host pool, cumulative

    @property
    def ipc_fallbacks(self) -> int:
        """Transfers that asked for an in-host copy but went over ZeroMQ, cumulative."""
        return self._pools.fallbacks

    def start(self, transfer_id: str, dest: Destination, timeout_s: float | None = None) -> str:
        """Open a transfer; the transport it will use ("ipc" or "zmq"). `poll_acks` reports a
        failed ack for it if none came `timeout_s` seconds from now. The first transfer to an
        in-host pool opens it (a shared-memory segment is prefaulted: ~0.1 s per GB)."""
        if transfer_id in self._transfers:
            raise ValueError(f"transfer {transfer_id} is already in progress")
        if len(set(dest.block_ids)) != len(dest.block_ids) or any(b < 0 for b in dest.block_ids):
            raise ValueError(f"destination block ids must be distinct and >= 0: {dest.block_ids}")
        pool = self._pools.reach(dest) if dest.use_ipc else None
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._transfers[transfer_id] = _Transfer(
            dest, self._socket(dest.zmq_endpoint), pool, deadline
        )
        return "zmq" if pool is None else "ipc"

    def send_layer(
        self,
        transfer_id: str,
        layer: int,
        kv_cache: Any,
        src_block_ids: Sequence[int],
        dst_offset: int = 0,
    ) -> int:
        """Send layer `layer` of source blocks `src_block_ids` of `kv_cache` [layers, 2, blocks,
        block_size, kv_heads, head_dim] to destination blocks
        `dest.block_ids[dst_offset : dst_offset + len(src_block_ids)]`; the bytes sent. From a
        GPU pool, call it once the layer's kernels are launched (it never waits for them)."""
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
        frames = self._layers
        device = is_device_array(kv_cache)
        if device:
            frames.after_compute()
        if t.pool is not None:
            self._check_pool(t.pool.array, kv_cache, layer, dst)
            copy = frames.copy_device if device else frames.copy_host
            return self._queue(transfer_id, t, copy(transfer_id, t.dest.checksum, t.pool, layer,
                                                    kv_cache, src.tolist(), dst))  # fmt: skip
        step = max(1, self.max_frame_bytes // max(1, kv_cache[layer, :, 0].nbytes))
        gather = frames.gather_device if device else frames.gather_host
        sent = 0
        for i in range(0, src.size, step):
            s, d = src[i : i + step].tolist(), dst[i : i + step]
            sent += self._queue(transfer_id, t, gather(transfer_id, t.dest.checksum, layer,
                                                       kv_cache, s, d))  # fmt: skip
        return sent

    def finish(self, transfer_id: str, num_layers: int, num_blocks: int) -> None:
        """Say every layer is sent: `num_layers` layers of `num_blocks` destination blocks in
        all (what the receiver expects); it goes after every frame still waiting on copies.
        The ack comes through `poll_acks`."""
        t = self._get(transfer_id)
        done = KVDone(transfer_id=transfer_id, num_layers=num_layers, num_blocks=num_blocks)
        self._queue(transfer_id, t, Frames(None, lambda: [encode(done)], 0))

    def poll_acks(self) -> list[KVAck]:
        """Send the frames whose copies completed, then return the acks of this sender's
        transfers that arrived, without blocking; each ends its transfer. A transfer past its
        timeout, or whose frames the destination would not take, ends with a failed ack."""
        acks: list[KVAck] = []
        for tid, t in list(self._transfers.items()):
            try:
                self._flush(tid, t)
            except KVTransferError as e:
                acks.append(KVAck(transfer_id=tid, ok=False, error=str(e)))
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
                elif self._end(ack.transfer_id):  # a failed one may still have copies out
                    acks.append(ack)
        now = time.monotonic()
        for tid, t in list(self._transfers.items()):
            if t.deadline is not None and now > t.deadline:
                self._end(tid)
                acks.append(KVAck(transfer_id=tid, ok=False, error="no ack before the timeout"))
        return acks

    def abort(self, transfer_id: str) -> bool:
        """Forget a transfer (frames already queued in ZeroMQ still go); whether it was in
        progress. Returns only once no copy of it into an in-host pool is in flight, so its
        blocks may be reused right after."""
        return self._end(transfer_id)

    @property
    def in_progress(self) -> list[str]:
        return list(self._transfers)

    def close(self) -> None:
        """Close the sockets (each waits up to linger_ms for queued frames) and pools."""
        for sock in self._sockets.values():
            sock.close()
        self._pools.close()
        self._sockets.clear()
        self._transfers.clear()

    def _end(self, tid: str) -> bool:
        t = self._transfers.pop(tid, None)
        if t is not None and any(f.event is not None for f in t.queue):
            self._settle()  # its copies may still be writing into the destination
        return t is not None

    def _settle(self) -> None:
        self._layers.settle()

    def _queue(self, tid: str, t: _Transfer, frames: Frames | None) -> int:
        """Queue one layer's frames (None: dropped by fault injection); the bytes they carry."""
        if frames is None:
            return 0
        t.queue.append(frames)
        self._flush(tid, t)
        self.bytes_sent += frames.nbytes
        return frames.nbytes

    def _flush(self, tid: str, t: _Transfer) -> None:
        """Send the transfer's queued frames, in order, up to the first whose copy is busy."""
        while t.queue and (t.queue[0].event is None or t.queue[0].event.done):
            self._send(tid, t, t.queue.popleft().build())

    def _send(self, tid: str, t: _Transfer, frames: list) -> None:
        deadline = time.monotonic() + self.send_timeout_s
        while True:
            try:
                t.sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
                return
            except zmq.Again:
                left_ms = int((deadline - time.monotonic()) * 1000)
                if left_ms <= 0 or not t.sock.poll(left_ms, zmq.POLLOUT):
                    self._end(tid)
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

    @staticmethod
    def _check_pool(pool: Any, kv: Any, layer: int, dst: list[int]) -> None:
        if pool.dtype != kv.dtype or pool.shape[3:] != kv.shape[3:] or layer >= pool.shape[0]:
            raise ValueError(
                f"destination pool {pool.shape} {pool.dtype} cannot take layer "
                f"{layer} of {kv.shape} {kv.dtype}"
            )
        if dst and max(dst) >= pool.shape[2]:
            raise ValueError(f"destination blocks {dst} outside the pool's {pool.shape[2]}")
