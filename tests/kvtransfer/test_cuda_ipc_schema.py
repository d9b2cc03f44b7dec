"""CUDA IPC pool descriptions on every wire they cross (engine messages, worker messages, gRPC),
malformed handles rejected with a clear error, and senders that cannot use a pool falling back
to ZeroMQ. No GPU needed: opening a handle is tests/gpu/test_cuda_ipc.py's job."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from pydantic import ValidationError

from pdserve.engine import messages as m
from pdserve.engine import worker_protocol as w
from pdserve.kvtransfer import CudaIpcPool, KVReceiver, KVSender
from pdserve.kvtransfer.cuda_ipc import ipc_pool_name
from pdserve.kvtransfer.device_copy import host_blocks, is_device_array, kv_dtype, scatter_blocks
from pdserve.kvtransfer.schema import IPC_HANDLE_BYTES, check_ipc_handle
from pdserve.node.proto_convert import cuda_ipc_from_proto, cuda_ipc_to_proto
from pdserve.proto import pdserve_pb2 as pb
from tests.kvtransfer.conftest import DST_IDS, SHAPE, DestPool, make_source, pump, send_all

HANDLE = bytes(range(64))  # zero bytes included: a handle is binary, not text
POOL = CudaIpcPool(handle=HANDLE, offset=256, nbytes=1 << 30)


def test_handle_is_exactly_64_bytes():
    assert IPC_HANDLE_BYTES == 64 and check_ipc_handle(bytearray(HANDLE)) == HANDLE
    for bad, what in ((HANDLE[:63], "got 63"), (HANDLE + b"\0", "got 65"), (b"", "got 0"),
                      (HANDLE.hex(), "got a str"), (None, "got a NoneType")):  # fmt: skip
        with pytest.raises(ValueError, match=f"a CUDA IPC memory handle is 64 bytes, {what}"):
            check_ipc_handle(bad)


def test_pool_names_follow_handles():
    assert ipc_pool_name(HANDLE) == ipc_pool_name(bytearray(HANDLE)) != ipc_pool_name(b"\1" * 64)
    assert ipc_pool_name(HANDLE).startswith("cuda_ipc_") and len(ipc_pool_name(HANDLE)) < 64


@pytest.mark.parametrize(
    "msg",
    [
        m.EngineReady(num_blocks=9, block_size=64, max_model_len=2048, kv_cuda_ipc=[POOL],
                      kv_dtype="bfloat16", backend="cupy"),
        m.AddRequest(request_id="r", prompt_token_ids=[1, 2], params={},
                     kv_push=m.KVPushSpec(transfer_id="t", zmq_endpoints=["tcp://h:1"],
                                          cuda_ipc=[POOL], block_ids=[3], first_block=0)),
    ],
)  # fmt: skip
def test_engine_messages_round_trip(msg):
    assert m.decode(m.encode(msg)) == msg


def test_worker_message_round_trips():
    start = w.KVStart(transfer_id="t", zmq_endpoint="tcp://h:1", block_ids=[1], use_ipc=True,
                      cuda_ipc=POOL, timeout_s=3.0)  # fmt: skip
    assert w.decode(w.encode(start)) == start
    assert w.decode(w.encode(start.model_copy(update={"cuda_ipc": None}))).cuda_ipc is None


def _ready_frame(handle: object) -> bytes:
    pool = {"handle": handle, "offset": 0, "nbytes": 4}
    fields = {"num_blocks": 1, "block_size": 16, "max_model_len": 64, "kv_cuda_ipc": [pool]}
    return msgpack.packb({"type": "ready", "v": m.SCHEMA_VERSION, **fields})


@pytest.mark.parametrize("handle,why", [(HANDLE[:63], "64 bytes, got 63"),
                                        (HANDLE * 2, "64 bytes, got 128"),
                                        (HANDLE.hex(), "bytes")])  # fmt: skip
def test_malformed_handles_are_rejected_clearly(handle, why):
    with pytest.raises(m.MessageError, match=f"{why}.*kv_cuda_ipc"):
        m.decode(_ready_frame(handle))
    with pytest.raises(ValidationError):
        CudaIpcPool(handle=handle, offset=0, nbytes=1)
    with pytest.raises(ValidationError, match="offset"):
        CudaIpcPool(handle=HANDLE, offset=-1, nbytes=1)


def test_grpc_destination_round_trip():
    dest = pb.KVDestination(rank=1, zmq_endpoint="tcp://h:1", block_ids=[4, 5],
                            **cuda_ipc_to_proto(POOL))  # fmt: skip
    back = pb.KVDestination.FromString(dest.SerializeToString())
    assert back.cuda_ipc_handle == HANDLE and cuda_ipc_from_proto(back) == POOL
    assert cuda_ipc_to_proto(None) == {} and cuda_ipc_from_proto(pb.KVDestination()) is None
    bad = pb.KVDestination(rank=2, cuda_ipc_handle=HANDLE[:40])
    with pytest.raises(ValueError, match="rank 2's cuda_ipc_handle: .*64 bytes, got 40"):
        cuda_ipc_from_proto(bad)


def test_host_helpers_on_numpy_pools():
    kv = make_source()[1]  # one layer [2, blocks, block_size, kv_heads, head_dim]
    assert not is_device_array(kv) and kv_dtype("float32") == np.float32
    np.testing.assert_array_equal(host_blocks(kv, [3, 1]), kv[:, [3, 1]])
    out = np.zeros_like(kv)
    scatter_blocks(out, [5, 2], kv[:, [3, 1]])
    np.testing.assert_array_equal(out[:, [5, 2]], kv[:, [3, 1]])


def test_host_pool_sender_sends_a_gpu_destination_over_zmq(ctx):
    """A NumPy prefill pool cannot write a GPU pool: ZeroMQ, counted as a fallback."""
    dest = DestPool("zmq")
    rx = KVReceiver(ctx, "tcp://127.0.0.1:*", dest.kv)
    tx = KVSender(ctx)
    try:
        d = dest.destination(rx.endpoint)
        d = type(d)(**{**d.__dict__, "use_ipc": True, "shm_shape": SHAPE, "cuda_ipc": POOL})
        rx.expect("g1", DST_IDS, num_layers=4)
        assert tx.start("g1", d) == "zmq" and tx.ipc_fallbacks == 1
        send_all(tx, "g1", make_source())
        (res,), (ack,) = pump(rx, tx, results=1, acks=1)
        assert res.ok and ack.ok
    finally:
        tx.close()
        rx.close()


def test_gpu_pool_sender_does_not_attach_shared_memory(ctx):
    """A sender whose pool is on the GPU never maps a NumPy decode pool: ZeroMQ, counted."""
    dest = DestPool("ipc")
    tx = KVSender(ctx, device=True)
    try:
        assert tx.start("g2", dest.destination("tcp://127.0.0.1:9")) == "zmq"
        assert tx.ipc_fallbacks == 1 and len(tx._pools) == 0
    finally:
        tx.close()
        dest.release()
