"""Whole transfers over ZeroMQ and shared memory land exactly the right bytes, nothing else."""

from __future__ import annotations

import multiprocessing
import time

import numpy as np
import pytest

from pdserve.kvtransfer import KVReceiver, KVSender, KVTransferError, SharedKVPool
from tests.kvtransfer.conftest import (
    DST_IDS,
    SHAPE,
    SRC_IDS,
    DestPool,
    expected_pool,
    make_source,
    pump,
    send_all,
    settle,
)
from tests.kvtransfer.peer import send_transfer

BLOCK_BYTES = 2 * 4 * 2 * 8 * 4  # one block of one layer, K and V, float32


@pytest.mark.parametrize("checksum", [False, True])
def test_full_transfer(tx: KVSender, rx: KVReceiver, dest: DestPool, checksum: bool) -> None:
    src, before = make_source(), dest.kv.copy()
    rx.expect("t1", DST_IDS, num_layers=4)
    assert tx.start("t1", dest.destination(rx.endpoint, checksum=checksum)) == dest.transport
    send_all(tx, "t1", src)
    (res,), (ack,) = pump(rx, tx, results=1, acks=1)
    assert res.ok and ack.ok and res.transfer_id == ack.transfer_id == "t1", res
    assert res.bytes == 4 * 5 * BLOCK_BYTES == rx.bytes_received == tx.bytes_sent
    np.testing.assert_array_equal(dest.kv, expected_pool(before, src, SRC_IDS, DST_IDS))
    assert rx.frames_rejected == 0 and tx.in_progress == [] and rx.pending == []


def test_partial_transfer(tx: KVSender, rx: KVReceiver, dest: DestPool) -> None:
    """The decode node had the first 2 blocks cached: only the last 3 travel."""
    src, before = make_source(seed=1), dest.kv.copy()
    rx.expect("t2", DST_IDS[2:], num_layers=4)
    tx.start("t2", dest.destination(rx.endpoint, checksum=True))
    send_all(tx, "t2", src, SRC_IDS[2:], dst_offset=2)
    (res,), (ack,) = pump(rx, tx, results=1, acks=1)
    assert res.ok and ack.ok
    want = expected_pool(before, src, SRC_IDS[2:], DST_IDS[2:])
    np.testing.assert_array_equal(dest.kv, want)
    assert (dest.kv[:, :, DST_IDS[:2]] == before[:, :, DST_IDS[:2]]).all()


def test_chunked_prefill_and_split_frames(ctx, rx: KVReceiver, dest: DestPool) -> None:
    """Layers pushed chunk by chunk (2 then 3 blocks), each chunk split into 1-block frames."""
    tx = KVSender(ctx, max_frame_bytes=BLOCK_BYTES)
    src, before = make_source(seed=2), dest.kv.copy()
    rx.expect("t3", DST_IDS, num_layers=4)
    tx.start("t3", dest.destination(rx.endpoint, checksum=True))
    for lo, hi in ((0, 2), (2, 5)):
        for layer in range(4):
            tx.send_layer("t3", layer, src, SRC_IDS[lo:hi], dst_offset=lo)
    tx.finish("t3", 4, 5)
    (res,), (ack,) = pump(rx, tx, results=1, acks=1)
    assert res.ok and ack.ok
    np.testing.assert_array_equal(dest.kv, expected_pool(before, src, SRC_IDS, DST_IDS))
    tx.close()


@pytest.mark.parametrize("transport", ["zmq", "ipc"])
def test_uint16_storage(ctx, tx: KVSender, transport: str) -> None:
    """bf16 pools are stored as 2-byte words; the dtype travels by name."""
    dest = DestPool(transport, dtype="uint16")
    rx = KVReceiver(ctx, "tcp://127.0.0.1:*", dest.kv, shm_name=dest.name)
    try:
        src, before = make_source(dtype="uint16", seed=3), dest.kv.copy()
        rx.expect("t4", DST_IDS, num_layers=4)
        tx.start("t4", dest.destination(rx.endpoint, checksum=True))
        send_all(tx, "t4", src)
        (res,), _ = pump(rx, tx, results=1, acks=1)
        assert res.ok and res.bytes == 4 * 5 * BLOCK_BYTES // 2
        np.testing.assert_array_equal(dest.kv, expected_pool(before, src, SRC_IDS, DST_IDS))
    finally:
        rx.close()
        dest.release()


def test_block_runs(tx: KVSender, rx: KVReceiver, dest: DestPool) -> None:
    """Consecutive ids on both sides (copied as runs over ipc), broken runs, a reversed run."""
    src_ids, dst_ids = [4, 5, 6, 9, 10, 1, 0], [10, 11, 12, 13, 3, 0, 1]
    src, before = make_source(seed=7), dest.kv.copy()
    rx.expect("runs", dst_ids, num_layers=4)
    tx.start("runs", dest.destination(rx.endpoint, dst_ids, checksum=True))
    send_all(tx, "runs", src, src_ids)
    (res,), (ack,) = pump(rx, tx, results=1, acks=1)
    assert res.ok and ack.ok, res
    np.testing.assert_array_equal(dest.kv, expected_pool(before, src, src_ids, dst_ids))


def test_socket_and_pool_reused(tx: KVSender, rx: KVReceiver, dest: DestPool) -> None:
    src = make_source(seed=4)
    for i in range(3):
        rx.expect(f"r{i}", DST_IDS, num_layers=4)
        tx.start(f"r{i}", dest.destination(rx.endpoint))
        send_all(tx, f"r{i}", src)
    res, acks = pump(rx, tx, results=3, acks=3)
    assert all(r.ok for r in res) and all(a.ok for a in acks)
    assert len(tx._sockets) == 1 and len(tx._pools) == (dest.transport == "ipc")


@pytest.mark.parametrize("transport", ["zmq", "ipc"])
def test_sender_in_another_process(rx: KVReceiver, dest: DestPool) -> None:
    src, before = make_source(seed=5), dest.kv.copy()
    rx.expect("x1", DST_IDS, num_layers=4)
    mp = multiprocessing.get_context("spawn")
    with mp.Pool(1) as p:
        job = p.apply_async(
            send_transfer, (dest.destination(rx.endpoint, checksum=True), "x1", src, SRC_IDS)
        )
        (res,), _ = pump(rx, None, results=1, timeout_s=20)
        assert job.get(timeout=20) is True
    assert res.ok
    np.testing.assert_array_equal(dest.kv, expected_pool(before, src, SRC_IDS, DST_IDS))


def test_ipc_falls_back_to_zmq(ctx, tx: KVSender) -> None:
    dest = DestPool("zmq")
    rx = KVReceiver(ctx, "tcp://127.0.0.1:*", dest.kv)
    try:
        d = dest.destination(rx.endpoint)
        d = type(d)(
            **{**d.__dict__, "use_ipc": True, "shm_name": "pdkv_absent_1", "shm_shape": SHAPE}
        )
        rx.expect("f1", DST_IDS, num_layers=4)
        assert tx.start("f1", d) == "zmq" and tx.ipc_fallbacks == 1
        send_all(tx, "f1", make_source())
        (res,), _ = pump(rx, tx, results=1, acks=1)
        assert res.ok
    finally:
        rx.close()


@pytest.mark.parametrize("transport", ["ipc"])
def test_restarted_receiver_gets_a_fresh_attach(ctx, tx: KVSender, dest: DestPool) -> None:
    """A decode node that restarts makes a new segment of the same name; the sender must not
    keep writing into the old one."""
    rx = KVReceiver(ctx, "tcp://127.0.0.1:*", dest.kv, shm_name=dest.name)
    rx.expect("s1", DST_IDS, num_layers=4)
    tx.start("s1", dest.destination(rx.endpoint))
    send_all(tx, "s1", make_source())
    pump(rx, tx, results=1, acks=1)
    rx.close()
    dest.release()
    fresh = SharedKVPool.create(dest.name, SHAPE)
    try:
        fresh.array[...] = -1.0
        rx = KVReceiver(ctx, "tcp://127.0.0.1:*", fresh.array, shm_name=fresh.name)
        rx.expect("s2", DST_IDS, num_layers=4)
        src = make_source(seed=6)
        tx.start("s2", dest.destination(rx.endpoint, checksum=True))
        send_all(tx, "s2", src)
        (res,), _ = pump(rx, tx, results=1, acks=1)
        assert res.ok
        np.testing.assert_array_equal(fresh.array[:, :, DST_IDS], src[:, :, SRC_IDS])
        rx.close()
    finally:
        fresh.close()
        fresh.unlink()


def test_send_to_nobody_times_out(ctx) -> None:
    tx = KVSender(ctx, send_timeout_s=0.2)
    dest = DestPool("zmq")
    tx.start("n1", dest.destination("tcp://127.0.0.1:9"))  # nothing listens on port 9
    t0 = time.monotonic()
    with pytest.raises(KVTransferError, match="took no frame"):
        tx.send_layer("n1", 0, make_source(), SRC_IDS)
    assert time.monotonic() - t0 < 1.0 and tx.in_progress == []
    tx.close()


def test_timeouts_both_ends(ctx, rx: KVReceiver, dest: DestPool) -> None:
    tx = KVSender(ctx)
    rx.expect("late", DST_IDS, num_layers=4, timeout_s=0.05)
    tx.start("late", dest.destination(rx.endpoint), timeout_s=0.05)
    time.sleep(0.1)
    (res,) = rx.poll()
    (ack,) = tx.poll_acks()
    assert not res.ok and "timed out" in res.error
    assert not ack.ok and "timeout" in ack.error
    tx.close()


def test_misuse_raises(tx: KVSender, rx: KVReceiver, dest: DestPool) -> None:
    with pytest.raises(ValueError, match="in \\[0, 16\\)"):
        rx.expect("m", [3, 16], num_layers=4)
    with pytest.raises(ValueError, match="distinct"):
        rx.expect("m", [3, 3], num_layers=4)
    with pytest.raises(ValueError, match="num_layers"):
        rx.expect("m", [3], num_layers=5)
    tx.start("m", dest.destination(rx.endpoint))
    with pytest.raises(ValueError, match="overrun"):
        tx.send_layer("m", 0, make_source(), SRC_IDS, dst_offset=1)
    with pytest.raises(ValueError, match="source blocks"):
        tx.send_layer("m", 0, make_source(), [0, 16])
    if dest.transport == "ipc":
        with pytest.raises(ValueError, match="cannot take"):
            tx.send_layer("m", 0, make_source(dtype="uint16"), SRC_IDS)
        tx.start("m2", dest.destination(rx.endpoint, [3, 99]))
        with pytest.raises(ValueError, match="outside the pool"):
            tx.send_layer("m2", 0, make_source(), [0, 1])
    with pytest.raises(ValueError, match="not in progress"):
        tx.send_layer("nope", 0, make_source(), SRC_IDS)
    assert settle(rx, 0.01) == []
