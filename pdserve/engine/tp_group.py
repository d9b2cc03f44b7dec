"""Collectives between the tensor-parallel ranks of one node.

On the GPU this is NCCL's job; on the NumPy backend the ranks are processes of one host and the
collectives run over ZeroMQ ipc sockets: every rank binds one PULL socket and pushes its partial
arrays (zero-copy) to every other rank. Every rank adds the partials in rank order, so all ranks
end with bit-identical sums, which keeps the replicated parts of the model (norms, the router's
choice of experts) in lockstep.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import msgpack
import numpy as np
import zmq

MAX_COLLECTIVE_BYTES = 1 << 30  # one partial: 8192 tokens x a 2560 hidden in float32 is 84 MB
POLL_MS = 200  # how often a waiting rank checks that its peers still live
_DTYPES = ("<f4", "<f8", "<f2", "<i4", "<i8")  # what partials may be; never objects


class TPError(RuntimeError):
    """A peer rank died or sent something that is not a partial of this collective."""


class TPGroup(Protocol):
    """What the model needs from its tensor-parallel group."""

    rank: int
    size: int

    def all_reduce(self, x: np.ndarray) -> np.ndarray: ...

    def gather(self, x: np.ndarray) -> np.ndarray | None: ...


class SingleRank:
    """Tensor parallelism of size 1: every collective is the identity."""

    rank, size = 0, 1

    def all_reduce(self, x: np.ndarray) -> np.ndarray:
        return x

    def gather(self, x: np.ndarray) -> np.ndarray | None:
        return x

    def close(self) -> None:
        pass


class ZmqGroup:
    """Rank `rank` of `size`; `address(r)` is rank r's ipc endpoint. `alive()` is asked while
    waiting: False (a peer died) ends the wait with TPError instead of hanging."""

    def __init__(
        self,
        rank: int,
        size: int,
        address: Callable[[int], str],
        alive: Callable[[], bool] = lambda: True,
        timeout_s: float = 600.0,
    ) -> None:
        self.rank, self.size = rank, size
        self.alive = alive
        self.timeout_s = timeout_s
        self.ctx = zmq.Context()
        self.inbox = self.ctx.socket(zmq.PULL)
        self.inbox.setsockopt(zmq.MAXMSGSIZE, MAX_COLLECTIVE_BYTES + 4096)
        self.inbox.bind(address(rank))
        self.peers: dict[int, zmq.Socket] = {}
        for r in range(size):
            if r != rank:
                sock = self.ctx.socket(zmq.PUSH)
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(address(r))
                self.peers[r] = sock
        self.seq = 0  # collectives so far; every rank runs the same sequence of them
        self.early: dict[tuple[int, int], np.ndarray] = {}  # (seq, rank) -> a partial

    def all_reduce(self, x: np.ndarray) -> np.ndarray:
        """The sum of every rank's `x` (same shape and dtype on all ranks), on every rank."""
        parts = self._exchange(x, everyone=True)
        out = parts[0].copy()
        for p in parts[1:]:
            out += p
        return out

    def gather(self, x: np.ndarray) -> np.ndarray | None:
        """Rank 0: every rank's `x` [..., n_r] concatenated along the last axis; others: None."""
        parts = self._exchange(x, everyone=False)
        return np.concatenate(parts, axis=-1) if self.rank == 0 else None

    def _exchange(self, x: np.ndarray, everyone: bool) -> list[np.ndarray]:
        x = np.ascontiguousarray(x)
        if x.nbytes > MAX_COLLECTIVE_BYTES:
            raise TPError(f"a partial of {x.nbytes} bytes is over {MAX_COLLECTIVE_BYTES}")
        seq, self.seq = self.seq, self.seq + 1
        header = msgpack.packb([seq, self.rank, x.dtype.str, list(x.shape)])
        targets = self.peers if everyone else ({0: self.peers[0]} if self.rank else {})
        for sock in targets.values():
            sock.send_multipart([header, x], copy=False)
        if not everyone and self.rank != 0:
            return []
        parts: dict[int, np.ndarray] = {self.rank: x}
        for r in self.peers:
            got = self.early.pop((seq, r), None)
            if got is not None:
                parts[r] = got
        deadline = time.monotonic() + self.timeout_s
        while len(parts) < self.size:
            if not self.inbox.poll(POLL_MS):
                if not self.alive() or time.monotonic() > deadline:
                    raise TPError(f"rank {self.rank}: a peer rank stopped answering")
                continue
            s, r, arr = self._recv()
            if s == seq:
                parts[r] = arr
            elif s > seq:
                self.early[(s, r)] = arr
            else:
                raise TPError(f"rank {r} sent a partial of collective {s} during {seq}")
        return [parts[r] for r in range(self.size)]

    def _recv(self) -> tuple[int, int, np.ndarray]:
        frames = self.inbox.recv_multipart(copy=False)
        try:
            seq, rank, dtype, shape = msgpack.unpackb(frames[0].bytes)
            arr = np.frombuffer(frames[1].buffer, dtype=np.dtype(dtype)).reshape(shape)
            if len(frames) != 2 or rank not in self.peers:
                raise ValueError("unexpected frames")
        except (ValueError, TypeError, IndexError, msgpack.UnpackException) as e:
            raise TPError(f"rank {self.rank}: malformed collective message: {e}") from None
        return int(seq), int(rank), arr

    def close(self) -> None:
        self.ctx.destroy(linger=0)
