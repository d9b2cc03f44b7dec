"""What another process does in the CUDA IPC tests (run through multiprocessing's spawn): open
the test's KV pool from its handle and write blocks of a seeded source pool into it."""

from __future__ import annotations

import time

import numpy as np

from pdserve.kvtransfer.schema import CudaIpcPool


def source_bits(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """The source pool's contents as bf16 bit patterns (NaNs included: bytes are compared)."""
    return np.random.default_rng(seed).integers(0, 1 << 16, size=shape, dtype=np.uint16)


def device_source(shape: tuple[int, ...], seed: int):
    """A bf16 KV pool on the GPU holding `source_bits(shape, seed)`, allocated as the backend
    allocates pools."""
    import cupy as cp

    from pdserve.backends.cupy_ops import CupyOps

    kv = CupyOps().alloc_kv_cache(shape)
    kv.view(np.uint16)[...] = cp.asarray(source_bits(shape, seed))
    return kv


def copy_blocks(pool: CudaIpcPool, shape, src_shape, seed, src_ids, dst_ids) -> str:
    """Open `pool` ([layers, 2, blocks, ...] bf16), copy every layer's `src_ids` of the source
    to `dst_ids` with the sender's primitive, wait, close; the pool's name as opened."""
    from pdserve.backends.cupy_kernels import BF16
    from pdserve.kvtransfer.cuda_ipc import OpenedPool
    from pdserve.kvtransfer.device_copy import DeviceStager
    from pdserve.kvtransfer.layer_frames import block_runs

    src = device_source(src_shape, seed)
    opened = OpenedPool(pool, shape, BF16)
    stager = DeviceStager()
    stager.after_compute()
    for layer in range(shape[0]):
        stager.copy_runs(opened.array, src, layer, block_runs(list(src_ids), list(dst_ids)))
    stager.record().synchronize()
    name = opened.name
    opened.close()
    return name


def send_transfer(endpoint: str, pool: CudaIpcPool, shape, src_shape, seed, src_ids, dst_ids):
    """A whole transfer with KVSender from a GPU pool, checksummed: (transport, ack ok, bytes)."""
    import zmq

    from pdserve.kvtransfer import Destination, KVSender

    src = device_source(src_shape, seed)
    ctx = zmq.Context()
    tx = KVSender(ctx, send_timeout_s=5.0, device=True)
    try:
        dest = Destination(endpoint, list(dst_ids), None, tuple(shape), "bfloat16",
                           checksum=True, use_ipc=True, cuda_ipc=pool)  # fmt: skip
        transport = tx.start("ipc1", dest, timeout_s=20)
        for layer in range(shape[0]):
            # two pieces per layer, as chunked prefill sends them
            tx.send_layer("ipc1", layer, src, src_ids[:2], 0)
            tx.send_layer("ipc1", layer, src, src_ids[2:], 2)
        tx.finish("ipc1", shape[0], len(dst_ids))
        deadline = time.monotonic() + 20
        acks = []
        while not acks and time.monotonic() < deadline:
            acks = tx.poll_acks()
            time.sleep(0.001)
        return transport, bool(acks) and acks[0].ok, tx.bytes_sent
    finally:
        tx.close()
        ctx.destroy(linger=1000)
