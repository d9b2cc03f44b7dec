"""Factories for KV transfer tests: pools with poisoned contents, a receiver on a free loopback
port, a sender, and a loop that polls both until results arrive."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator, Sequence

import numpy as np
import pytest
import zmq

from pdserve.kvtransfer import (
    Destination,
    KVAck,
    KVReceiver,
    KVSender,
    SharedKVPool,
    TransferResult,
    pool_name,
)

SHAPE = (4, 2, 16, 4, 2, 8)  # [layers, 2, blocks, block_size, kv_heads, head_dim]
POISON = -7.0  # what every destination block holds before a transfer
SRC_IDS = [3, 9, 0, 14, 7]  # prefill blocks of the prompt
DST_IDS = [11, 2, 5, 8, 15]  # the decode blocks allocated for it
MAX_FRAME = 1 << 20  # bytes


def make_source(shape: Sequence[int] = SHAPE, dtype: str = "float32", seed: int = 0) -> np.ndarray:
    """A prefill pool of distinct random values."""
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    return rng.integers(0, 1 << 15, size=shape).astype(dtype)


def expected_pool(before: np.ndarray, src: np.ndarray, src_ids, dst_ids, layers=None):
    """`before` with layers `layers` (all by default) of src blocks copied to dst blocks."""
    out = before.copy()
    for layer in range(src.shape[0]) if layers is None else layers:
        out[layer][:, list(dst_ids)] = src[layer][:, list(src_ids)]
    return out


def unique_shm_name(tag: str = "t") -> str:
    return pool_name(f"{tag}{os.getpid()}{uuid.uuid4().hex[:6]}", 8003)


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


class DestPool:
    """A decode pool, poisoned; in shared memory for transport "ipc"."""

    def __init__(self, transport: str, shape=SHAPE, dtype: str = "float32") -> None:
        self.transport = transport
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.shm = (
            SharedKVPool.create(unique_shm_name(), shape, dtype) if transport == "ipc" else None
        )
        self.kv = self.shm.array if self.shm is not None else np.zeros(shape, dtype)
        self.kv[...] = POISON if self.dtype.kind == "f" else 0xDEAD
        self.name = self.shm.name if self.shm is not None else None

    def destination(self, endpoint: str, block_ids=DST_IDS, checksum: bool = False) -> Destination:
        ipc = self.transport == "ipc"
        return Destination(
            zmq_endpoint=endpoint,
            block_ids=list(block_ids),
            shm_name=self.name,
            shm_shape=self.shape if ipc else None,
            shm_dtype=self.dtype.name,
            checksum=checksum,
            use_ipc=ipc,
        )

    def release(self) -> None:
        self.kv = None
        if self.shm is not None:
            self.shm.close()
            self.shm.unlink()
            self.shm = None


@pytest.fixture(params=["zmq", "ipc"])
def transport(request) -> str:
    return request.param


@pytest.fixture
def dest(transport: str) -> Iterator[DestPool]:
    pool = DestPool(transport)
    yield pool
    pool.release()


@pytest.fixture
def rx(ctx: zmq.Context, dest: DestPool) -> Iterator[KVReceiver]:
    r = KVReceiver(ctx, "tcp://127.0.0.1:*", dest.kv, max_frame_bytes=MAX_FRAME, shm_name=dest.name)
    yield r
    r.close()


@pytest.fixture
def tx(ctx: zmq.Context) -> Iterator[KVSender]:
    s = KVSender(ctx, send_timeout_s=2.0)
    yield s
    s.close()


def pump(
    rx: KVReceiver, tx: KVSender | None, results: int = 1, acks: int = 0, timeout_s: float = 5.0
) -> tuple[list[TransferResult], list[KVAck]]:
    """Poll both ends until `results` results and `acks` acks arrived (or fail the test)."""
    got_r: list[TransferResult] = []
    got_a: list[KVAck] = []
    deadline = time.monotonic() + timeout_s
    while len(got_r) < results or len(got_a) < acks:
        got_r += rx.poll()
        if tx is not None:
            got_a += tx.poll_acks()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out with results {got_r} and acks {got_a}")
        time.sleep(0.001)
    return got_r, got_a


def settle(rx: KVReceiver, seconds: float = 0.1) -> list[TransferResult]:
    """Everything the receiver reports within `seconds`."""
    out: list[TransferResult] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        out += rx.poll()
        time.sleep(0.002)
    return out


def send_all(
    tx: KVSender,
    tid: str,
    src: np.ndarray,
    src_ids=SRC_IDS,
    dst_offset: int = 0,
    layers=None,
    num_blocks: int | None = None,
) -> None:
    """Send every layer (or `layers`) of `src_ids`, then KVDone."""
    for layer in range(src.shape[0]) if layers is None else layers:
        tx.send_layer(tid, layer, src, src_ids, dst_offset)
    tx.finish(tid, src.shape[0], len(src_ids) if num_blocks is None else num_blocks)
