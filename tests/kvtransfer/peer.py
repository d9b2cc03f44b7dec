"""Code the cross-process tests run in a spawned child (importable, so spawn can find it)."""

from __future__ import annotations

import time

import numpy as np
import zmq

from pdserve.kvtransfer import Destination, KVSender, SharedKVPool, host_id


def attach_and_write(name: str, shape: tuple[int, ...], value: float) -> str:
    """Attach to the owner's pool, fill it with `value`, exit without unlinking; our host id."""
    pool = SharedKVPool.attach(name, shape, np.float32)
    pool.array[...] = value
    pool.close()
    return host_id()


def send_transfer(dest: Destination, tid: str, src: np.ndarray, src_ids: list[int]) -> bool:
    """Run one whole transfer as a prefill node would; whether the receiver acked it ok."""
    ctx = zmq.Context()
    tx = KVSender(ctx, send_timeout_s=5.0)
    try:
        tx.start(tid, dest, timeout_s=10.0)
        for layer in range(src.shape[0]):
            tx.send_layer(tid, layer, src, src_ids)
        tx.finish(tid, src.shape[0], len(src_ids))
        while True:
            for ack in tx.poll_acks():
                return ack.ok
            time.sleep(0.001)
    finally:
        tx.close()
        ctx.term()
