from __future__ import annotations

import pickle

import msgpack
import pytest

from pdserve.kvtransfer.schema import (
    MAX_HEADER_BYTES,
    SCHEMA_VERSION,
    KVAck,
    KVDone,
    KVLayer,
    KVLayerIPC,
    SchemaError,
    decode,
    encode,
)

LAYER = dict(transfer_id="t1", layer=3, block_ids=[4, 7], dtype="float32", shape=[2, 2, 4, 2, 8])


def raw(**fields) -> bytes:
    return msgpack.packb({"type": "kv_layer", "v": SCHEMA_VERSION, **LAYER, **fields})


@pytest.mark.parametrize(
    "header",
    [
        KVLayer(**LAYER, checksum=0xDEADBEEF),
        KVLayer(**LAYER),
        KVLayerIPC(**LAYER, checksum=1, shm_name="pdkv_a_8003"),
        KVDone(transfer_id="t1", num_layers=28, num_blocks=5),
        KVAck(transfer_id="t1", ok=False, error="incomplete"),
        KVAck(transfer_id="t1", ok=True),
    ],
)
def test_round_trip(header) -> None:
    back = decode(encode(header))
    assert type(back) is type(header) and back == header


@pytest.mark.parametrize(
    "frame, match",
    [
        (b"\xc1garbage", "not msgpack"),
        (msgpack.packb([1, 2, 3]), "not a map"),
        (msgpack.packb(3), "not a map"),
        (pickle.dumps({"type": "kv_layer", "v": 1}), "not msgpack|not a map"),
        (b"x" * (MAX_HEADER_BYTES + 1), "exceeds"),
        (msgpack.packb({"type": "kv_layer", **LAYER}), "version None"),
        (msgpack.packb({"type": "kv_layer", "v": 2, **LAYER}), "version 2"),
        (msgpack.packb({"type": "kv_layer", "v": True, **LAYER}), "version True"),
        (msgpack.packb({"type": "kv_layer", "v": 1.0, **LAYER}), "version 1.0"),
        (msgpack.packb({"type": "rm -rf", "v": 1}), "unknown header type"),
        (msgpack.packb({"type": 5, "v": 1}), "unknown header type"),
        (raw(layer="3"), "layer"),
        (raw(layer=True), "layer"),
        (raw(layer=-1), "layer"),
        (raw(layer=1.5), "layer"),
        (raw(block_ids=[1, "2"]), "block_ids"),
        (raw(block_ids=[-4]), "block_ids"),
        (raw(shape="2,2"), "shape"),
        (raw(checksum=1 << 33), "checksum"),
        (raw(transfer_id=""), "transfer_id"),
        (raw(transfer_id=b"t1"), "transfer_id"),
        (raw(evil=1), "evil"),
        (msgpack.packb({"type": "kv_done", "v": 1, "transfer_id": "t"}), "num_layers"),
        (msgpack.packb({"type": "kv_ack", "v": 1, "transfer_id": "t", "ok": 1}), "ok"),
        (msgpack.packb({1: 2}, strict_types=False), "not msgpack"),
    ],
)
def test_rejects(frame: bytes, match: str) -> None:
    with pytest.raises(SchemaError, match=match):
        decode(frame)
