"""The decode side of a KV transfer: a ROUTER that scatters layer frames into expected blocks.

The engine registers each transfer's destination blocks (`expect`) before asking a prefill node
for them, then calls `poll()` from its loop. A frame is applied only after its header, its
transfer, its blocks, its dtype, shape, size and checksum all check out, and only ever to blocks
its transfer expects; anything else is logged, counted and answered with a failed `KVAck` when
its transfer is known (that transfer then fails; later frames of it are dropped). A transfer
succeeds at `KVDone` only if every expected layer x block landed. Nothing here raises on bad
input or blocks.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq
from zmq.utils.monitor import parse_monitor_message

from pdserve.kvtransfer.device_copy import scatter_blocks
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

log = logging.getLogger(__name__)

DEFAULT_MAX_FRAME_BYTES = 256 << 20  # one layer of 64k bf16 tokens of ERNIE-4.5-21B-A3B: 128 MiB


def kv_endpoint(host: str, cache_queue_port: int, rank: int) -> str:
    """The KV endpoint of TP rank `rank`: tcp://host:(cache_queue_port + rank)."""
    return f"tcp://{host}:{cache_queue_port + rank}"


@dataclass(frozen=True)
class TransferResult:
    """The end of one expected transfer, as `poll()` reports it (once per transfer)."""

    transfer_id: str
    ok: bool
    bytes: int  # bytes of KV that landed in the pool (both transports)
    error: str = ""


@dataclass
class _Expected:
    block_ids: np.ndarray  # [n] int64, destination blocks the transfer must fill
    index: dict[int, int]  # block id -> column of `landed`
    landed: np.ndarray  # [num_layers, n] bool
    deadline: float | None  # time.monotonic() seconds
    bytes: int = 0
    peer: bytes | None = field(default=None)  # routing id of the last sender seen


class KVReceiver:
    """Receives KV for the pool `kv_cache` [layers, 2, blocks, block_size, kv_heads, head_dim].

    Binds a ROUTER on `bind_addr` (e.g. `kv_endpoint(host, cache_queue_port, rank)`, or
    `tcp://127.0.0.1:*` for a free port; `.endpoint` is the bound address). ZeroMQ drops the
    connection of a peer that sends a frame over `max_frame_bytes` (bytes); that shows as
    `peers_disconnected`, and its transfer fails at KVDone or its timeout. When in-host
    senders can write `kv_cache` (a `SharedKVPool`'s array, or a GPU pool shared through CUDA
    IPC), `shm_name` is the name they know it by (the segment's name, or
    `cuda_ipc.ipc_pool_name`): only then are KVLayerIPC frames accepted (a frame naming another
    pool would mark blocks landed that nobody wrote). A GPU pool takes ZeroMQ payloads through
    host-to-device copies on the current stream. Queued input is bounded by `rcvhwm` messages
    of at most `max_frame_bytes` per connected sender.
    """

    def __init__(
        self,
        ctx: zmq.Context,
        bind_addr: str,
        kv_cache: Any,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        shm_name: str | None = None,
        rcvhwm: int = 256,
        max_tombstones: int = 4096,
    ) -> None:
        if kv_cache.ndim != 6 or kv_cache.shape[1] != 2:
            raise ValueError(
                f"kv_cache must be [layers, 2, blocks, block_size, kv_heads, "
                f"head_dim], got {kv_cache.shape}"
            )
        self.kv = kv_cache
        self.max_frame_bytes = max_frame_bytes
        self.shm_name = shm_name  # accept KVLayerIPC frames that name this pool
        self._block_bytes = kv_cache[0, :, 0].nbytes  # K and V of one block of one layer
        self._expected: dict[str, _Expected] = {}
        self._tombstones: OrderedDict[str, None] = OrderedDict()  # cancelled / finished ids
        self._max_tombstones = max_tombstones
        self.bytes_received = 0  # cumulative
        self.frames_rejected = 0  # invalid frames, cumulative
        self.frames_dropped = 0  # frames of cancelled or finished transfers, cumulative
        self.peers_disconnected = 0  # cumulative
        self.transfers_ok = 0
        self.transfers_failed = 0
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)
        self.sock.setsockopt(zmq.RCVHWM, rcvhwm)  # messages queued per peer: the memory bound
        self.sock.setsockopt(zmq.LINGER, 0)
        self._monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.sock.bind(bind_addr)
        self.endpoint: str = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()

    def expect(
        self,
        transfer_id: str,
        block_ids: Sequence[int],
        num_layers: int,
        timeout_s: float | None = None,
    ) -> None:
        """Allow transfer `transfer_id` to write `num_layers` layers of `block_ids`; it fails
        if it has not completed `timeout_s` seconds from now. Ids must be fresh per attempt."""
        if not isinstance(transfer_id, str) or not transfer_id:
            raise ValueError(f"transfer_id must be a non-empty str, got {transfer_id!r}")
        if transfer_id in self._expected:
            raise ValueError(f"transfer {transfer_id} is already expected")
        if not 1 <= num_layers <= self.kv.shape[0]:
            raise ValueError(f"num_layers must be in [1, {self.kv.shape[0]}], got {num_layers}")
        ids = np.asarray(block_ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.kv.shape[2]):
            raise ValueError(f"block ids must be in [0, {self.kv.shape[2]}), got {list(ids)}")
        if len(set(ids.tolist())) != ids.size:
            raise ValueError(f"block ids must be distinct, got {list(ids)}")
        self._tombstones.pop(transfer_id, None)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._expected[transfer_id] = _Expected(
            ids,
            {b: i for i, b in enumerate(ids.tolist())},
            np.zeros((num_layers, ids.size), dtype=bool),
            deadline,
        )

    def cancel(self, transfer_id: str) -> bool:
        """Stop accepting frames of a transfer (no result is reported); whether it was pending.
        Shared-memory writes cannot be stopped here: reuse its blocks only once the sender
        has acknowledged the abort."""
        pending = self._expected.pop(transfer_id, None) is not None
        self._bury(transfer_id)
        return pending

    @property
    def pending(self) -> list[str]:
        return list(self._expected)

    def poll(self, max_messages: int = 10_000, budget_s: float = 0.02) -> list[TransferResult]:
        """Apply pending frames without blocking, until none is left, `max_messages` were
        handled, or `budget_s` seconds passed (at least one is handled); the transfers that
        completed or failed since the last call."""
        results: list[TransferResult] = []
        self._drain_monitor()
        stop = time.monotonic() + budget_s
        for i in range(max_messages):
            if i and time.monotonic() > stop:
                break
            try:
                parts = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            self._handle(parts, results)
        now = time.monotonic()
        for tid, exp in list(self._expected.items()):
            if exp.deadline is not None and now > exp.deadline:
                self._fail(exp.peer, tid, "timed out", results)
        return results

    def close(self) -> None:
        self.sock.disable_monitor()
        self._monitor.close(linger=0)
        self.sock.close(linger=0)

    def _handle(self, parts: list[zmq.Frame], results: list[TransferResult]) -> None:
        ident = parts[0].bytes
        if len(parts) not in (2, 3):
            return self._reject(f"message of {len(parts) - 1} frames")
        try:
            h = decode(parts[1].buffer)
        except SchemaError as e:
            return self._reject(str(e))
        if isinstance(h, KVAck):
            return self._reject("a KVAck sent to the receiver")
        tid = h.transfer_id
        exp = self._expected.get(tid)
        if exp is None:
            if tid in self._tombstones:
                self.frames_dropped += 1
                log.debug("dropped a frame of cancelled or finished transfer %s", tid)
            else:
                self._reject(f"frame of unknown transfer {tid!r:.80}")
            if isinstance(h, KVDone):  # tell the sender now, so it need not wait for a lease
                self._ack(ident, tid, False, "transfer unknown, cancelled or finished")
            return None
        exp.peer = ident
        if isinstance(h, KVDone):
            return self._finish(ident, tid, exp, h, results)
        payload = parts[2] if len(parts) == 3 else None
        err = self._check_layer(h, exp, payload)
        if err:
            self.frames_rejected += 1
            return self._fail(ident, tid, err, results)
        if payload is not None:  # into [2, blocks, block_size, kv_heads, head_dim]
            data = np.frombuffer(payload.buffer, dtype=self.kv.dtype).reshape(h.shape)
            scatter_blocks(self.kv[h.layer], h.block_ids, data)
        exp.landed[h.layer, [exp.index[b] for b in h.block_ids]] = True
        nbytes = len(h.block_ids) * self._block_bytes
        exp.bytes += nbytes
        self.bytes_received += nbytes
        return None

    def _check_layer(self, h: KVLayer, exp: _Expected, payload: zmq.Frame | None) -> str:
        """Why this layer frame must not be applied, or "" when it may."""
        ipc = isinstance(h, KVLayerIPC)
        if ipc == (payload is not None):
            return f"{h.TYPE} with {'a' if payload is not None else 'no'} payload frame"
        if ipc and (self.shm_name is None or h.shm_name != self.shm_name):
            return f"{h.TYPE} into pool {h.shm_name!r:.40}, this receiver's is {self.shm_name!r}"
        if h.layer >= exp.landed.shape[0]:
            return f"layer {h.layer} outside the transfer's {exp.landed.shape[0]} layers"
        ids = h.block_ids
        if not ids or len(set(ids)) != len(ids):
            return f"block ids must be distinct and non-empty, got {ids[:16]}"
        stray = [b for b in ids if b not in exp.index]
        if stray:
            return f"blocks {stray[:16]} are not the transfer's"
        if h.dtype != self.kv.dtype.name:
            return f"dtype {h.dtype!r:.32} does not match the pool's {self.kv.dtype.name}"
        want = [2, len(ids), *self.kv.shape[3:]]
        if h.shape != want:
            return f"shape {h.shape[:8]} does not match {want}"
        nbytes = len(ids) * self._block_bytes
        if payload is not None and len(payload.buffer) != nbytes:
            return f"payload of {len(payload.buffer)} bytes, shape {want} needs {nbytes}"
        if h.checksum is not None:
            if payload is not None:
                got = checksum(payload.buffer)
            else:
                got = blocks_checksum(self.kv[h.layer], ids)
            if got != h.checksum:
                return f"checksum {got:#010x} != {h.checksum:#010x} (layer {h.layer})"
        return ""

    def _finish(
        self, ident: bytes, tid: str, exp: _Expected, h: KVDone, results: list[TransferResult]
    ) -> None:
        layers, n = exp.landed.shape
        if (h.num_layers, h.num_blocks) != (layers, n):
            return self._fail(
                ident,
                tid,
                f"KVDone says {h.num_layers} layers x "
                f"{h.num_blocks} blocks, expected {layers} x {n}",
                results,
            )
        missing = np.argwhere(~exp.landed)
        if len(missing):
            layer, col = missing[0]
            return self._fail(
                ident,
                tid,
                f"incomplete: {len(missing)} of {layers * n} layer x "
                f"block pairs missing (first: layer {layer}, block "
                f"{exp.block_ids[col]})",
                results,
            )
        del self._expected[tid]
        self._bury(tid)
        self.transfers_ok += 1
        self._ack(ident, tid, True)
        results.append(TransferResult(tid, True, exp.bytes))
        return None

    def _fail(
        self, ident: bytes | None, tid: str, reason: str, results: list[TransferResult]
    ) -> None:
        log.warning("KV transfer %s failed: %s", tid, reason)
        exp = self._expected.pop(tid)
        self._bury(tid)
        self.transfers_failed += 1
        if ident is not None:
            self._ack(ident, tid, False, reason)
        results.append(TransferResult(tid, False, exp.bytes, reason))

    def _reject(self, reason: str) -> None:
        self.frames_rejected += 1
        log.warning("rejected a KV frame: %s", reason)

    def _ack(self, ident: bytes, tid: str, ok: bool, error: str = "") -> None:
        try:  # a ROUTER drops what it cannot route; it never blocks
            self.sock.send_multipart(
                [ident, encode(KVAck(transfer_id=tid, ok=ok, error=error))], zmq.NOBLOCK
            )
        except zmq.ZMQError as e:
            log.warning("could not ack KV transfer %s: %s", tid, e)

    def _bury(self, tid: str) -> None:
        self._tombstones[tid] = None
        self._tombstones.move_to_end(tid)
        while len(self._tombstones) > self._max_tombstones:
            self._tombstones.popitem(last=False)

    def _drain_monitor(self) -> None:
        while True:
            try:
                event = parse_monitor_message(self._monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self.peers_disconnected += 1
                log.warning(
                    "KV peer %s disconnected: it closed, or sent a frame over %d bytes "
                    "or a protocol error",
                    event.get("endpoint"),
                    self.max_frame_bytes,
                )
