"""Hostile and broken input: every bad frame is rejected, logged and counted, never written
outside its transfer's blocks, and the receiver keeps serving good transfers afterwards."""

from __future__ import annotations

import logging
import pickle
import time
import zlib
from collections.abc import Iterator

import msgpack
import numpy as np
import pytest
import zmq

from pdserve.kvtransfer import KVAck, KVReceiver, KVSender
from pdserve.kvtransfer.schema import KVDone, KVLayer, KVLayerIPC, decode, encode
from tests.kvtransfer.conftest import (
    DST_IDS,
    MAX_FRAME,
    SRC_IDS,
    DestPool,
    expected_pool,
    make_source,
    pump,
    send_all,
    settle,
)

pytestmark = pytest.mark.parametrize("transport", ["zmq"])


@pytest.fixture
def raw(ctx: zmq.Context, rx: KVReceiver) -> Iterator[zmq.Socket]:
    """A bare DEALER that sends whatever a test builds."""
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.IMMEDIATE, 1)
    s.connect(rx.endpoint)
    yield s
    s.close()


def layer_frames(src: np.ndarray, src_layer: int = 0, tid: str = "bad", **over) -> list[bytes]:
    """A valid [header, payload] for layer `src_layer` of SRC_IDS -> DST_IDS, with `over`
    applied to the header fields (and `payload=` replacing the payload)."""
    layer = src_layer
    data = np.ascontiguousarray(src[layer][:, SRC_IDS])
    payload = over.pop("payload", data.tobytes())
    fields = dict(
        transfer_id=tid,
        layer=layer,
        block_ids=DST_IDS,
        dtype="float32",
        shape=list(data.shape),
        checksum=zlib.crc32(data.tobytes()),
    )
    fields.update(over)
    return [encode(KVLayer(**fields)), payload]


def good_transfer_after(tx: KVSender, rx: KVReceiver, dest: DestPool, tid: str = "good") -> None:
    src, before = make_source(seed=9), dest.kv.copy()
    rx.expect(tid, DST_IDS, num_layers=4)
    tx.start(tid, dest.destination(rx.endpoint, checksum=True))
    send_all(tx, tid, src)
    (res,), (ack,) = pump(rx, tx, results=1, acks=1)
    assert res.ok and ack.ok
    np.testing.assert_array_equal(dest.kv, expected_pool(before, src, SRC_IDS, DST_IDS))


def recv_ack(sock: zmq.Socket, rx: KVReceiver, timeout_s: float = 2.0) -> KVAck:
    deadline = time.monotonic() + timeout_s
    while not sock.poll(1, zmq.POLLIN):
        rx.poll()
        assert time.monotonic() < deadline, "no ack"
    ack = decode(sock.recv())
    assert isinstance(ack, KVAck)
    return ack


SRC = make_source(seed=8)
HDR = layer_frames(SRC)[0]
KNOWN_BAD = {  # frames of an expected transfer: it fails, the sender gets ok=False
    "block not the transfer's": (layer_frames(SRC, block_ids=[11, 2, 5, 8, 1]), "not the transfer"),
    "block out of range": (layer_frames(SRC, block_ids=[11, 2, 5, 8, 999]), "not the transfer"),
    "duplicate blocks": (layer_frames(SRC, block_ids=[11, 11, 5, 8, 15]), "distinct"),
    "layer past the transfer": (layer_frames(SRC, layer=7), "layer 7"),
    "wrong shape": (layer_frames(SRC, shape=[2, 5, 4, 2, 4]), "shape"),
    "wrong dtype": (layer_frames(SRC, dtype="float16"), "dtype"),
    "short payload": (layer_frames(SRC, payload=b"\0" * 100), "payload of 100 bytes"),
    "long payload": (layer_frames(SRC, payload=b"\0" * 2561), "payload of 2561 bytes"),
    "bad checksum": (layer_frames(SRC, checksum=12345), "checksum"),
    "missing payload": (layer_frames(SRC)[:1], "no payload"),
    "ipc into another pool": (
        [encode(KVLayerIPC(**decode(HDR).model_dump(), shm_name="x"))],
        "into pool 'x'",
    ),
    "ipc with payload": (
        [encode(KVLayerIPC(**decode(HDR).model_dump(), shm_name="p")), b"\0" * 2560],
        "a payload",
    ),
}


@pytest.mark.parametrize("case", list(KNOWN_BAD))
def test_bad_frame_of_known_transfer(case, tx, rx, dest, raw, caplog) -> None:
    frames, reason = KNOWN_BAD[case]
    before = dest.kv.copy()
    rx.expect("bad", DST_IDS, num_layers=4)
    raw.send_multipart(frames)
    (res,), _ = pump(rx, None, results=1)
    assert not res.ok and reason in res.error, res
    ack = recv_ack(raw, rx)
    assert not ack.ok and reason in ack.error
    assert rx.frames_rejected == 1 and "failed" in caplog.text
    raw.send_multipart(layer_frames(SRC, src_layer=1))  # later frames of a failed transfer: dropped
    raw.send(encode(KVDone(transfer_id="bad", num_layers=4, num_blocks=5)))
    assert not recv_ack(raw, rx).ok and rx.frames_dropped == 2 and settle(rx) == []
    np.testing.assert_array_equal(dest.kv, before)
    good_transfer_after(tx, rx, dest)


UNATTRIBUTED = {  # nothing to fail but the frame itself
    "unknown transfer": layer_frames(SRC, tid="stranger"),
    "garbage": [b"\xc1\xc1\xc1 not msgpack", b"x" * 64],
    "pickle": [pickle.dumps({"type": "kv_layer", "v": 1}), pickle.dumps(SRC[0])],
    "msgpack list": [msgpack.packb(["kv_layer", 1]), b""],
    "wrong version": [msgpack.packb({**msgpack.unpackb(HDR), "v": 9}), b""],
    "extra field": [msgpack.packb({**msgpack.unpackb(HDR), "evil": 1}), b""],
    "too many frames": [*layer_frames(SRC), b"more"],
    "an ack": [encode(KVAck(transfer_id="bad", ok=True))],
}


@pytest.mark.parametrize("case", list(UNATTRIBUTED))
def test_unattributable_frame(case, tx, rx, dest, raw, caplog) -> None:
    caplog.set_level(logging.WARNING)
    before = dest.kv.copy()
    rx.expect("bad", DST_IDS, num_layers=4)
    raw.send_multipart(UNATTRIBUTED[case])
    deadline = time.monotonic() + 2
    while rx.frames_rejected == 0 and time.monotonic() < deadline:
        assert rx.poll() == []
    assert rx.frames_rejected == 1 and "rejected a KV frame" in caplog.text
    assert not raw.poll(50, zmq.POLLIN)  # nobody to answer
    np.testing.assert_array_equal(dest.kv, before)
    assert rx.pending == ["bad"]  # the expected transfer is untouched
    good_transfer_after(tx, rx, dest)


def test_oversized_frame_drops_the_connection(tx, rx, dest, raw) -> None:
    before = dest.kv.copy()
    rx.expect("bad", DST_IDS, num_layers=4)
    raw.send_multipart(layer_frames(SRC, payload=b"\0" * (MAX_FRAME + 1)))
    deadline = time.monotonic() + 2
    while rx.peers_disconnected == 0:
        rx.poll()
        assert time.monotonic() < deadline, "ZeroMQ kept the connection"
    np.testing.assert_array_equal(dest.kv, before)
    assert rx.bytes_received == 0
    good_transfer_after(tx, rx, dest)


def test_done_with_a_missing_layer(tx, rx, dest) -> None:
    src, before = make_source(seed=10), dest.kv.copy()
    rx.expect("short", DST_IDS, num_layers=4)
    tx.start("short", dest.destination(rx.endpoint))
    send_all(tx, "short", src, layers=[0, 1, 3])
    (res,), (ack,) = pump(rx, tx, results=1, acks=1)
    assert not res.ok and not ack.ok and "incomplete" in ack.error and "layer 2" in ack.error
    np.testing.assert_array_equal(
        dest.kv, expected_pool(before, src, SRC_IDS, DST_IDS, layers=[0, 1, 3])
    )
    good_transfer_after(tx, rx, dest)


def test_done_with_wrong_counts(tx, rx, dest) -> None:
    rx.expect("count", DST_IDS, num_layers=4)
    tx.start("count", dest.destination(rx.endpoint))
    send_all(tx, "count", make_source(), num_blocks=4)
    (res,), (ack,) = pump(rx, tx, results=1, acks=1)
    assert not res.ok and "expected 4 x 5" in ack.error


def test_cancel_drops_later_frames(tx, rx, dest) -> None:
    src, before = make_source(seed=11), dest.kv.copy()
    rx.expect("c", DST_IDS, num_layers=4)
    tx.start("c", dest.destination(rx.endpoint))
    tx.send_layer("c", 0, src, SRC_IDS)
    assert settle(rx) == [] and rx.bytes_received == 5 * 512
    assert rx.cancel("c") and not rx.cancel("c")
    send_all(tx, "c", src, layers=[1, 2, 3])
    _, (ack,) = pump(rx, tx, results=0, acks=1)
    assert not ack.ok and settle(rx) == [] and rx.frames_dropped == 4
    assert rx.frames_rejected == 0
    np.testing.assert_array_equal(dest.kv, expected_pool(before, src, SRC_IDS, DST_IDS, [0]))
    good_transfer_after(tx, rx, dest)
