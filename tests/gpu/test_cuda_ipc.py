"""KV between GPU pools: the CUDA IPC copy between two processes, whole transfers (CUDA IPC and
ZeroMQ from and into device pools), an in-host 1P1D pair of cupy nodes giving a mixed cupy node's
greedy tokens, and a node sizing its KV pool from --gpu-memory-utilization."""

from __future__ import annotations

import multiprocessing
import re
import signal
import time
from collections.abc import Iterator

import numpy as np
import pytest

from pdserve.backends import gpu_unavailable_reason

REASON = gpu_unavailable_reason()
if REASON is not None:
    pytest.skip(f"GPU tests need CuPy and a CUDA GPU: {REASON}", allow_module_level=True)
else:
    import cupy as cp
    import zmq

    from pdserve.backends.cupy_kernels import BF16
    from pdserve.backends.cupy_ops import CupyOps
    from pdserve.kvtransfer import Destination, KVReceiver, KVSender
    from pdserve.kvtransfer.cuda_ipc import export_pool, ipc_pool_name
    from tests.gpu import ipc_peer
    from tests.integration.conftest import Node, start_node
    from tests.integration.test_disagg import COMMON
    from tests.integration.test_mixed_node import GREEDY, PROMPTS
    from tests.kvtransfer.conftest import pump

pytestmark = pytest.mark.gpu

SRC_SHAPE = (3, 2, 13, 5, 3, 7)  # [layers, 2, blocks, block_size, kv_heads, head_dim], odd sizes
DST_SHAPE = (3, 2, 21, 5, 3, 7)  # the decode pool: more blocks than the prefill pool
SRC_IDS = [3, 4, 5, 11, 0]  # a run of three, then strays: a memcpy per run and K/V
DST_IDS = [17, 18, 19, 2, 20]
# no two neighbours consecutive: twelve runs, past MAX_MEMCPY_RUNS (gather/scatter kernels)
MANY_SRC = [12, 0, 7, 3, 9, 1, 5, 11, 2, 10, 4, 8]
MANY_DST = [20, 4, 15, 0, 8, 13, 2, 17, 6, 11, 19, 9]
IDS = {"few-runs": (SRC_IDS, DST_IDS), "many-runs": (MANY_SRC, MANY_DST)}
POISON = 0xDEAD  # bf16 bits every destination block holds before a transfer
# eager decode, so these tests depend on the transport alone (graphs have tests of their own)
CUPY = ("--backend", "cupy", "--graph-optimization-config", '{"use_cudagraph": false}')


@pytest.fixture
def seed() -> int:
    """Fresh data every run; the seed is printed, so a failure can be replayed."""
    s = int(np.random.SeedSequence().entropy) % 2**31
    print(f"seed {s}")
    return s


def dest_pool(offset: int = 0):
    """A poisoned bf16 decode pool `offset` bytes into a plain allocation (0: as the backend
    allocates it), and the allocation that keeps it alive."""
    if offset == 0:
        kv, mem = CupyOps().alloc_kv_cache(DST_SHAPE), None
    else:  # neither at the allocation's start nor at its end
        mem = cp.cuda.Memory(offset + int(np.prod(DST_SHAPE)) * BF16.itemsize + 4096)
        kv = cp.ndarray(DST_SHAPE, BF16, cp.cuda.MemoryPointer(mem, offset))
    kv.view(np.uint16).fill(POISON)
    return kv, mem


def expected(seed: int, src_ids=SRC_IDS, dst_ids=DST_IDS) -> np.ndarray:
    want = np.full(DST_SHAPE, POISON, dtype=np.uint16)
    src = ipc_peer.source_bits(SRC_SHAPE, seed)
    want[:, :, dst_ids] = src[:, :, src_ids]
    return want


def spawn():
    return multiprocessing.get_context("spawn").Pool(1)


@pytest.mark.parametrize("offset,ids", [(0, "few-runs"), (4096, "few-runs"), (0, "many-runs")],
                         ids=["own-allocation", "inside-allocation", "many-runs"])  # fmt: skip
def test_ipc_copy_between_processes(seed, offset, ids):
    """Another process opens the pool from its handle and copies blocks in; exactly those
    blocks change, also when the pool sits inside a larger allocation."""
    src_ids, dst_ids = IDS[ids]
    kv, _mem = dest_pool(offset)
    pool = export_pool(kv)
    assert pool.offset == offset and pool.nbytes == kv.nbytes and len(pool.handle) == 64
    with spawn() as p:
        name = p.apply(ipc_peer.copy_blocks,
                       (pool, DST_SHAPE, SRC_SHAPE, seed, src_ids, dst_ids))  # fmt: skip
    assert name == ipc_pool_name(pool.handle)
    np.testing.assert_array_equal(cp.asnumpy(kv.view(np.uint16)), expected(seed, *IDS[ids]))


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


@pytest.mark.parametrize("ids", list(IDS))
def test_whole_transfer_through_cuda_ipc(ctx, seed, ids):
    """KVSender in another process writes the pool through CUDA IPC, checksummed; the receiver
    sees every layer land, and the bytes are the source's."""
    src_ids, dst_ids = IDS[ids]
    kv, _ = dest_pool()
    pool = export_pool(kv)
    rx = KVReceiver(ctx, "tcp://127.0.0.1:*", kv, shm_name=ipc_pool_name(pool.handle))
    try:
        rx.expect("ipc1", dst_ids, num_layers=DST_SHAPE[0])
        with spawn() as p:
            job = p.apply_async(ipc_peer.send_transfer, (rx.endpoint, pool, DST_SHAPE, SRC_SHAPE,
                                                         seed, src_ids, dst_ids))  # fmt: skip
            (res,), _ = pump(rx, None, results=1, timeout_s=60)
            transport, acked, sent = job.get(timeout=60)
        assert (transport, acked) == ("ipc", True) and res.ok, res
        block = 2 * 5 * 3 * 7 * 2  # K and V of one block of one layer, bf16
        assert res.bytes == sent == rx.bytes_received == 3 * len(src_ids) * block
        assert rx.frames_rejected == 0
        np.testing.assert_array_equal(cp.asnumpy(kv.view(np.uint16)), expected(seed, *IDS[ids]))
    finally:
        rx.close()


@pytest.mark.parametrize("ids,frame_blocks", [("few-runs", 1), ("many-runs", 64)])
def test_whole_transfer_over_zmq_between_device_pools(ctx, seed, ids, frame_blocks):
    """From a GPU pool over ZeroMQ (pinned staging; 1-block frames, or a layer per frame) into
    a GPU pool, checksummed."""
    src_ids, dst_ids = IDS[ids]
    kv, _ = dest_pool()
    src = ipc_peer.device_source(SRC_SHAPE, seed)
    rx = KVReceiver(ctx, "tcp://127.0.0.1:*", kv)
    tx = KVSender(ctx, max_frame_bytes=frame_blocks * 2 * 5 * 3 * 7 * 2, device=True)
    try:
        rx.expect("z1", dst_ids, num_layers=3)
        dest = Destination(rx.endpoint, dst_ids, shm_dtype="bfloat16", checksum=True)
        assert tx.start("z1", dest) == "zmq"
        for layer in range(3):
            tx.send_layer("z1", layer, src, src_ids, 0)
        tx.finish("z1", 3, len(dst_ids))
        (res,), (ack,) = pump(rx, tx, results=1, acks=1, timeout_s=20)
        assert res.ok and ack.ok, res
        np.testing.assert_array_equal(cp.asnumpy(kv.view(np.uint16)), expected(seed, *IDS[ids]))
    finally:
        tx.close()
        rx.close()


def complete_each(node: Node, prompts: list[str]) -> list[str]:
    """Greedy completions one request at a time: every step's batch, and so every kernel's
    summation order, is the same on each node (bf16 results depend on batch shapes)."""
    client = node.client()
    return [client.completions.create(model="tiny", prompt=p, **GREEDY).choices[0].text
            for p in prompts]  # fmt: skip


def stop_all(*nodes: Node) -> None:
    for n in nodes:
        if n.proc.poll() is None:
            n.stop(signal.SIGKILL)
        n.remove_log()


@pytest.fixture(scope="module")
def mixed_outputs() -> Iterator[list[str]]:
    node = start_node(*CUPY, *COMMON)
    try:
        yield complete_each(node, PROMPTS[:24])
    finally:
        stop_all(node)


@pytest.mark.parametrize("protocol", ["ipc,zmq", "zmq"], ids=["cuda-ipc", "zmq"])
def test_innode_1p1d_on_one_gpu_matches_mixed(mixed_outputs, protocol):
    # pools of different sizes: the IPC pool must be opened with the decode pool's shape
    prefill = start_node("--splitwise-role", "prefill", "--cache-transfer-protocol", protocol,
                         *CUPY, *COMMON[:-1], "300")  # fmt: skip
    decode = start_node("--splitwise-role", "decode", "--innode-prefill-ports",
                        str(prefill.engine_port), *CUPY, *COMMON)  # fmt: skip
    try:
        assert complete_each(decode, PROMPTS[:24]) == mixed_outputs
        assert decode.metric("pd_fallback_total") == 0
        received = decode.metric("kv_bytes_received_total")
        assert received > 0 and prefill.metric("kv_bytes_sent_total") == received
        transport = "ipc" if protocol.startswith("ipc") else "zmq"
        assert prefill.metric(f'kv_transfers_total{{transport="{transport}"}}') == 24
        assert ("opened the CUDA IPC KV pool" in prefill.log()) == (transport == "ipc")
        decode.wait_blocks_free()
        prefill.wait_blocks_free()
    finally:
        stop_all(prefill, decode)


def test_kv_pool_sized_from_gpu_memory():
    """Half the GPU, less the tiny model's weights, activations and the graphs' margin."""
    free, total = cp.cuda.runtime.memGetInfo()
    if free < 0.6 * total:
        pytest.skip(f"needs 60% of the GPU free, {free / total:.0%} is")
    node = start_node(*CUPY, "--gpu-memory-utilization", "0.5")
    try:
        log = node.log()
        line = re.search(r"KV pool sizing: (.*)", log)
        assert line, log[-2000:]
        print(line.group(1))
        for part in ("x --gpu-memory-utilization 0.5", "weights", "activations", "KV cache",
                     "sequences of --max-model-len 2048 at once"):  # fmt: skip
            assert part in line.group(1)
        logged = int(re.search(r"= (\d+) blocks of 64 tokens", line.group(1)).group(1))
        deadline = time.monotonic() + 10  # the frontend learns the pool's size from the stats
        while (blocks := node.metric("kv_total_blocks")) == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert blocks == logged
        block_bytes = 4 * 2 * 64 * 2 * 16 * 2  # tiny: 4 layers, K and V, 64 tokens, 2 x 16, bf16
        kv_bytes = blocks * block_bytes
        assert 0.5 * total - (2 << 30) <= kv_bytes <= 0.5 * total - (1 << 30), (kv_bytes, total)
        out = node.client().completions.create(model="tiny", prompt="sized", **GREEDY)
        assert out.usage.completion_tokens == 16
    finally:
        stop_all(node)
