"""KV transfers of a tensor-parallel node: rank r of a prefill node pushes its KV shard to rank r
of the decode node, each through its own agent on cache-queue-port + r.

The engine (rank 0) drives the transfers as if there were one rank: `RankedSender` and
`RankedReceiver` do rank 0's part locally, tell the workers to do theirs, and report a transfer
done only once every rank's part is (and failed as soon as any rank's part failed). A worker's
part runs in its `RankKV`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from pdserve.engine import worker_protocol as w
from pdserve.kvtransfer.receiver import KVReceiver, TransferResult
from pdserve.kvtransfer.sender import Destination, KVSender, KVTransferError

logger = logging.getLogger("pdserve.engine")

Send = Callable[[int, w.WireMessage], None]  # (rank, message) to one worker


@dataclass
class RankedAck:
    """A transfer's end over all ranks; `worker_bytes` is what ranks 1.. moved."""

    transfer_id: str
    ok: bool
    error: str = ""
    worker_bytes: int = 0


@dataclass
class _Pending:
    waiting: set[int]  # ranks whose part has not ended yet
    worker_bytes: int = 0


def _absorb(pending: dict[str, _Pending], r: w.KVResult) -> tuple[str, bool, str, int] | None:
    """Record one worker's result; the transfer's end (id, ok, error, bytes) once decided."""
    p = pending.get(r.transfer_id)
    if p is None or r.rank not in p.waiting:
        return None  # ended already (failed on another rank, or cancelled)
    p.waiting.discard(r.rank)
    p.worker_bytes += r.bytes
    if not r.ok:
        del pending[r.transfer_id]
        return r.transfer_id, False, f"rank {r.rank}: {r.error}", p.worker_bytes
    if not p.waiting:
        del pending[r.transfer_id]
        return r.transfer_id, True, "", p.worker_bytes
    return None


def _to_workers(send: Send | None, size: int, msg: w.WireMessage) -> None:
    """`msg` to ranks 1..size-1 (none at TP 1)."""
    for rank in range(1, size):
        assert send is not None, "a tensor-parallel node needs its workers"
        send(rank, msg)


class RankedSender:
    """What `PrefillHandoff` sends through: rank 0's `KVSender` plus the workers' senders."""

    def __init__(self, local: KVSender, size: int = 1, send: Send | None = None) -> None:
        self.local = local
        self.size = size
        self.send = send
        self.results: list[w.KVResult] = []  # from workers, fed by the engine loop
        self._pending: dict[str, _Pending] = {}

    def start(self, tid: str, dests: Sequence[Destination], timeout_s: float) -> str:
        if len(dests) != self.size:
            raise ValueError(f"{len(dests)} KV destinations for {self.size} tensor-parallel ranks")
        transport = self.local.start(tid, dests[0], timeout_s=timeout_s)
        for rank, d in enumerate(dests[1:], start=1):
            self._to(rank, w.KVStart(
                transfer_id=tid, zmq_endpoint=d.zmq_endpoint, block_ids=d.block_ids,
                shm_name=d.shm_name or "", shm_shape=list(d.shm_shape or ()), shm_dtype=d.shm_dtype,
                checksum=d.checksum, use_ipc=d.use_ipc, cuda_ipc=d.cuda_ipc,
                timeout_s=float(timeout_s),
            ))  # fmt: skip
        self._pending[tid] = _Pending(set(range(self.size)))
        return transport

    def send_layer(self, tid: str, layer: int, kv: np.ndarray, src: Sequence[int], offset: int):
        return self.local.send_layer(tid, layer, kv, src, offset)

    def finish(self, tid: str, num_layers: int, num_blocks: int) -> None:
        self.local.finish(tid, num_layers, num_blocks)
        self._all(w.KVFinish(transfer_id=tid, num_layers=num_layers, num_blocks=num_blocks))

    def poll_acks(self) -> list[RankedAck]:
        ended: list[RankedAck] = []
        local = [w.KVResult(rank=0, transfer_id=a.transfer_id, ok=a.ok, error=a.error)
                 for a in self.local.poll_acks()]  # fmt: skip
        results, self.results = local + self.results, []
        for r in results:
            end = _absorb(self._pending, r)
            if end is not None:
                if not end[1]:
                    self._forget(end[0])
                ended.append(RankedAck(*end))
        return ended

    def abort(self, tid: str) -> bool:
        self._pending.pop(tid, None)
        return self._forget(tid)

    def _forget(self, tid: str) -> bool:
        self._all(w.KVForget(transfer_id=tid))
        return self.local.abort(tid)

    def close(self) -> None:
        self.local.close()

    def _to(self, rank: int, msg: w.WireMessage) -> None:
        assert self.send is not None, "a tensor-parallel sender needs its workers"
        self.send(rank, msg)

    def _all(self, msg: w.WireMessage) -> None:
        _to_workers(self.send, self.size, msg)


class RankedReceiver:
    """What `DecodeHandoff` receives through: rank 0's `KVReceiver` plus the workers'."""

    def __init__(self, local: KVReceiver, size: int = 1, send: Send | None = None) -> None:
        self.local = local
        self.sock = local.sock
        self.size = size
        self.send = send
        self.results: list[w.KVResult] = []  # from workers, fed by the engine loop
        self._pending: dict[str, _Pending] = {}

    def expect(self, tid: str, block_ids: Sequence[int], num_layers: int) -> None:
        self.local.expect(tid, block_ids, num_layers)
        _to_workers(self.send, self.size, w.KVExpect(transfer_id=tid, block_ids=list(block_ids),
                                                     num_layers=num_layers))  # fmt: skip
        self._pending[tid] = _Pending(set(range(self.size)))

    def cancel(self, tid: str) -> bool:
        self._pending.pop(tid, None)
        _to_workers(self.send, self.size, w.KVForget(transfer_id=tid))
        return self.local.cancel(tid)

    def poll(self) -> list[TransferResult]:
        local = [w.KVResult(rank=0, transfer_id=r.transfer_id, ok=r.ok, error=r.error,
                            bytes=r.bytes) for r in self.local.poll()]  # fmt: skip
        results, self.results = local + self.results, []
        ended = []
        for r in results:
            end = _absorb(self._pending, r)
            if end is not None:
                tid, ok, error, nbytes = end
                if not ok:
                    self.cancel(tid)
                ended.append(TransferResult(tid, ok, nbytes, error))
        return ended

    def close(self) -> None:
        self.local.close()


class RankKV:
    """A worker's KV agent: its rank's sender (prefill) or receiver (decode)."""

    def __init__(
        self, rank: int, kv: np.ndarray, sender: KVSender | None, receiver: KVReceiver | None
    ) -> None:
        self.rank = rank
        self.kv = kv
        self.sender = sender
        self.receiver = receiver
        self.sent: dict[str, int] = {}  # transfer id -> bytes this rank pushed
        self.failed: list[w.KVResult] = []

    def handle(self, msg: w.WireMessage) -> None:
        if isinstance(msg, w.KVStart) and self.sender is not None:
            dest = Destination(msg.zmq_endpoint, msg.block_ids, msg.shm_name or None,
                               tuple(msg.shm_shape) or None, msg.shm_dtype, msg.checksum,
                               msg.use_ipc, msg.cuda_ipc)  # fmt: skip
            try:
                self.sender.start(msg.transfer_id, dest, timeout_s=msg.timeout_s)
                self.sent[msg.transfer_id] = 0
            except ValueError as e:
                self._fail(msg.transfer_id, str(e))
        elif isinstance(msg, w.KVFinish) and msg.transfer_id in self.sent:
            try:
                self.sender.finish(msg.transfer_id, msg.num_layers, msg.num_blocks)
            except (KVTransferError, ValueError) as e:
                self._fail(msg.transfer_id, str(e))
        elif isinstance(msg, w.KVExpect) and self.receiver is not None:
            self.receiver.expect(msg.transfer_id, msg.block_ids, msg.num_layers)
        elif isinstance(msg, w.KVForget):
            self.sent.pop(msg.transfer_id, None)
            if self.sender is not None:
                self.sender.abort(msg.transfer_id)
            if self.receiver is not None:
                self.receiver.cancel(msg.transfer_id)

    def layer_hook(self, jobs: list[w.KVJob]) -> Callable[[int], None] | None:
        if not jobs or self.sender is None:
            return None

        def hook(layer: int) -> None:
            for job in jobs:
                if job.transfer_id in self.sent:
                    try:
                        self.sent[job.transfer_id] += self.sender.send_layer(
                            job.transfer_id, layer, self.kv, job.src_blocks, job.dst_offset
                        )
                    except (KVTransferError, ValueError) as e:
                        self._fail(job.transfer_id, str(e))

        return hook

    def _fail(self, tid: str, error: str) -> None:
        logger.warning("rank %d: KV transfer %s failed: %s", self.rank, tid, error)
        self.sent.pop(tid, None)
        if self.sender is not None:
            self.sender.abort(tid)
        self.failed.append(w.KVResult(rank=self.rank, transfer_id=tid, ok=False, error=error))

    def poll(self) -> list[w.KVResult]:
        out, self.failed = self.failed, []
        if self.sender is not None:
            for ack in self.sender.poll_acks():
                nbytes = self.sent.pop(ack.transfer_id, 0)
                out.append(w.KVResult(rank=self.rank, transfer_id=ack.transfer_id, ok=ack.ok,
                                      error=ack.error, bytes=nbytes))  # fmt: skip
        if self.receiver is not None:
            for res in self.receiver.poll():
                out.append(w.KVResult(rank=self.rank, transfer_id=res.transfer_id, ok=res.ok,
                                      error=res.error, bytes=res.bytes))  # fmt: skip
        return out

    @property
    def busy(self) -> bool:
        return bool(self.sent) or bool(self.receiver is not None and self.receiver.pending)

    def close(self) -> None:
        if self.sender is not None:
            self.sender.close()
        if self.receiver is not None:
            self.receiver.close()
