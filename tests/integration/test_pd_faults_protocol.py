"""Protocol abuse at a disaggregated pair's internal endpoints: garbage, oversized and pickle
payloads over raw ZeroMQ to the KV receiver (--cache-queue-port) and the engines'
--engine-worker-queue-port, and malformed or invalid gRPC messages to Node.Prefill and
Node.Generate. Each must be rejected, nothing unpickled, and the nodes must keep serving."""

from __future__ import annotations

import pickle
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import msgpack
import pytest
import zmq

from pdserve.engine import messages as m
from pdserve.kvtransfer.schema import KVAck, KVDone, decode, encode
from pdserve.node.grpc_service import MAX_GRPC_MESSAGE_BYTES
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from tests.integration.conftest import Node, free_ports, start_node
from tests.integration.test_faults import health
from tests.integration.test_mixed_node import GREEDY
from tests.integration.test_router import addr

COMMON = ("--block-size", "16", "--max-num-seqs", "16", "--num-gpu-blocks-override", "256")
MARKER = Path("/tmp/pdserve-pd-abuse-unpickled")  # created only if something unpickles EVIL
GREEDY_PB = pb.SamplingParams(temperature=0, top_p=1, repetition_penalty=1, max_tokens=4,
                              ignore_eos=True)  # fmt: skip
RPC_TIMEOUT_S = 15


class _Evil:
    def __reduce__(self):
        return (open, (str(MARKER), "w"))


EVIL = pickle.dumps(_Evil())


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Node, Node]]:
    """A prefill node and an in-host decode node in front of it."""
    MARKER.unlink(missing_ok=True)
    p = start_node("--splitwise-role", "prefill", *COMMON)
    d = start_node("--splitwise-role", "decode", "--innode-prefill-ports", str(p.engine_port),
                   *COMMON)  # fmt: skip
    yield p, d
    for n in (p, d):
        n.stop(signal.SIGKILL)
        n.remove_log()
    assert not MARKER.exists(), "a node unpickled a payload"


def zmq_call(endpoint: str, frames: list[bytes], wait_ms: int = 2000) -> list[bytes] | None:
    """Send one multipart message from a fresh DEALER; the reply, or None if none came."""
    ctx = zmq.Context.instance()
    with ctx.socket(zmq.DEALER) as sock:
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        sock.send_multipart(frames)
        return sock.recv_multipart() if sock.poll(wait_ms) else None


def stub(node: Node) -> pb_grpc.NodeStub:
    return pb_grpc.NodeStub(grpc.insecure_channel(addr(node)))


def rpc_code(call, request) -> grpc.StatusCode:
    """The status a unary or server-streaming call ends with."""
    try:
        out = call(request, timeout=RPC_TIMEOUT_S)
        if not isinstance(out, (bytes, pb.PrefillReply)):
            list(out)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def still_serves(p: Node, d: Node) -> None:
    """Both nodes healthy, and a request through the pair still moves KV between them."""
    assert health(p) == 200 and health(d) == 200
    moved = d.metric("kv_bytes_received_total")
    out = d.client().completions.create(model="tiny", prompt="still serving?", **GREEDY)
    assert out.usage.completion_tokens == 16
    assert d.metric("kv_bytes_received_total") > moved
    assert not MARKER.exists(), "a node unpickled a payload"
    p.wait_blocks_free()
    d.wait_blocks_free()


def kv_header(**fields) -> bytes:
    return msgpack.packb({"type": "kv_layer", "v": 1, "transfer_id": "nope", "layer": 0,
                          "block_ids": [0], "dtype": "float32", "shape": [2, 1, 16, 2, 16],
                          **fields})  # fmt: skip


KV_ABUSE = {
    "garbage": [b"\xff\x00 not msgpack at all"],
    "pickle": [EVIL],
    "pickle payload": [kv_header(), EVIL],
    "wrong version": [kv_header(v=99)],
    "unknown type": [msgpack.packb({"type": "exec", "v": 1, "code": "print(1)"})],
    "extra field": [kv_header(pickle=EVIL)],
    "oversized header": [kv_header(transfer_id="x" * (2 << 20))],
    "too many frames": [b"a"] * 5,
    "nested too deep": [b"\x91" * 100_000 + b"\xc0"],
    "ack sent to the receiver": [encode(KVAck(transfer_id="nope", ok=True))],
}


def test_kv_receiver_rejects_garbage_and_keeps_serving(pair):
    p, d = pair
    endpoint = f"tcp://127.0.0.1:{stub(d).GetInfo(pb.InfoRequest()).cache_queue_port}"
    rejected = d.log().count("rejected a KV frame")
    for name, frames in KV_ABUSE.items():
        assert zmq_call(endpoint, frames, wait_ms=100) is None, name
    # a KVDone of a transfer it never expected: a failed ack, so the receiver still answers
    reply = zmq_call(endpoint, [encode(KVDone(transfer_id="probe", num_layers=4, num_blocks=1))])
    assert reply is not None, "the KV receiver stopped answering"
    ack = decode(reply[0])
    assert isinstance(ack, KVAck) and ack.transfer_id == "probe" and not ack.ok
    assert d.log().count("rejected a KV frame") - rejected == len(KV_ABUSE) + 1
    still_serves(p, d)


ENGINE_ABUSE = {
    "garbage": [b"\xff\x00 not msgpack at all"],
    "pickle": [EVIL],
    "two frames": [m.encode(m.PeerInfoRequest()), EVIL],
    "not a question": [msgpack.packb({"type": "shutdown", "v": 1})],
    "nested too deep": [b"\x91" * 100_000 + b"\xc0"],
}


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_engine_port_rejects_garbage_and_keeps_serving(pair, role):
    p, d = pair
    node = p if role == "prefill" else d
    endpoint = f"tcp://127.0.0.1:{node.engine_port}"
    rejected = node.log().count("engine-worker-queue: rejected")
    for name, frames in ENGINE_ABUSE.items():
        reply = zmq_call(endpoint, frames)
        assert reply is not None, f"{name}: no answer"
        assert isinstance(m.decode(reply[0]), m.PeerError), name
    assert node.log().count("engine-worker-queue: rejected") - rejected == len(ENGINE_ABUSE)
    # over the size bound: ZeroMQ drops the connection, nothing reaches the engine
    assert zmq_call(endpoint, [b"\0" * (m.MAX_MESSAGE_BYTES + 1)], wait_ms=500) is None
    reply = zmq_call(endpoint, [m.encode(m.PeerInfoRequest())])
    assert reply is not None and m.decode(reply[0]) == m.PeerInfo(
        role=role, host="127.0.0.1", pd_comm_port=node.grpc_port
    )
    still_serves(p, d)


def oversized_prompt() -> bytes:
    """A message with one length-delimited field (3) just over the nodes' gRPC bound."""
    n = MAX_GRPC_MESSAGE_BYTES + 1
    length = bytearray()
    while n > 0x7F:
        length.append(n & 0x7F | 0x80)
        n >>= 7
    length.append(n)
    return b"\x1a" + bytes(length) + b"\x01" * (MAX_GRPC_MESSAGE_BYTES + 1)


def test_grpc_rejects_malformed_messages_and_keeps_serving(pair):
    p, d = pair
    for node, method in ((d, "/pdserve.v1.Node/Generate"), (p, "/pdserve.v1.Node/Prefill")):
        channel = grpc.insecure_channel(addr(node))
        call = channel.unary_stream if method.endswith("Generate") else channel.unary_unary
        raw = call(method)  # no serializers: the request goes out as the bytes given
        parse_errors = node.log().count("Error parsing message")
        for payload in (b"\xff\xff\xff\xff garbage", EVIL):
            assert rpc_code(raw, payload) in (grpc.StatusCode.INVALID_ARGUMENT,
                                              grpc.StatusCode.UNKNOWN), payload  # fmt: skip
        assert node.log().count("Error parsing message") - parse_errors >= 2, "not logged"
        assert rpc_code(raw, oversized_prompt()) == grpc.StatusCode.RESOURCE_EXHAUSTED
    still_serves(p, d)


def prefill_request(p: Node, d: Node, **kw) -> pb.PrefillRequest:
    info = stub(d).GetInfo(pb.InfoRequest())
    dest = pb.KVDestination(rank=0, zmq_endpoint=f"tcp://127.0.0.1:{info.cache_queue_port}",
                            block_ids=kw.pop("block_ids", [1, 2, 3]))  # fmt: skip
    fields = dict(request_id="abuse", transfer_id="abuse/1", prompt_token_ids=list(range(10, 50)),
                  params=GREEDY_PB, first_block=0, destinations=[dest], kv_dtype=info.kv_dtype,
                  block_size=info.block_size)  # fmt: skip
    return pb.PrefillRequest(**(fields | kw))


def test_grpc_rejects_invalid_requests_and_keeps_serving(pair):
    p, d = pair
    code = grpc.StatusCode
    generate = [
        (pb.GenerateRequest(request_id="a", prompt_token_ids=[5, 6]), code.INVALID_ARGUMENT),
        (pb.GenerateRequest(request_id="b", params=GREEDY_PB), code.INVALID_ARGUMENT),
        (pb.GenerateRequest(request_id="c", prompt_token_ids=[5] * 3000, params=GREEDY_PB),
         code.INVALID_ARGUMENT),
    ]  # fmt: skip
    for req, want in generate:
        assert rpc_code(stub(d).Generate, req) == want, req
    req = pb.GenerateRequest(request_id="d", prompt_token_ids=[5, 6], params=GREEDY_PB,
                             prefill_node=addr(d))  # fmt: skip
    assert rpc_code(stub(p).Generate, req) == code.FAILED_PRECONDITION
    prefill = [
        (prefill_request(p, d, destinations=[]), code.INVALID_ARGUMENT),
        (prefill_request(p, d, block_size=32), code.FAILED_PRECONDITION),
        (prefill_request(p, d, kv_dtype="int8"), code.FAILED_PRECONDITION),
        (prefill_request(p, d, block_ids=[1, 2]), code.INVALID_ARGUMENT),
        (prefill_request(p, d, block_ids=[1, 1, 2]), code.INVALID_ARGUMENT),
        (prefill_request(p, d, block_ids=[1, -2, 3]), code.INVALID_ARGUMENT),
        (prefill_request(p, d, first_block=7), code.INVALID_ARGUMENT),
        (prefill_request(p, d, params=pb.SamplingParams()), code.INVALID_ARGUMENT),
    ]
    for req, want in prefill:
        assert rpc_code(stub(p).Prefill, req) == want, req
    assert rpc_code(stub(d).Prefill, prefill_request(p, d)) == code.FAILED_PRECONDITION
    still_serves(p, d)


# --- Requests that must be refused, not kill the node (each gets fresh nodes) -----------------


@pytest.mark.parametrize("ids", [[264], [-1], [2**31 - 1]], ids=["vocab", "negative", "int32-max"])
def test_generate_with_token_ids_outside_the_vocabulary_is_rejected(node_factory, ids):
    d = node_factory("--splitwise-role", "decode", *COMMON)  # the tiny model's vocabulary: 264
    req = pb.GenerateRequest(request_id="oov", prompt_token_ids=[5, *ids, 6], params=GREEDY_PB)
    code = rpc_code(stub(d).Generate, req)
    # refused, and the node lives on (it must neither die nor compute from a wrapped-around id)
    assert (code, health(d)) == (grpc.StatusCode.INVALID_ARGUMENT, 200)


@pytest.mark.parametrize("endpoint", ["not-an-endpoint", "tcp://127.0.0.1:{free}"],
                         ids=["malformed", "nobody-listening"])  # fmt: skip
def test_prefill_to_an_unusable_kv_endpoint_fails_only_that_request(node_factory, endpoint):
    p = node_factory("--splitwise-role", "prefill", *COMMON)
    info = stub(p).GetInfo(pb.InfoRequest())
    dest = pb.KVDestination(rank=0, zmq_endpoint=endpoint.format(free=free_ports(1)[0]),
                            block_ids=[1, 2, 3])  # fmt: skip
    req = pb.PrefillRequest(request_id="lost", transfer_id="lost/1", params=GREEDY_PB,
                            prompt_token_ids=list(range(10, 50)), destinations=[dest],
                            kv_dtype=info.kv_dtype, block_size=info.block_size)  # fmt: skip
    assert rpc_code(stub(p).Prefill, req) != grpc.StatusCode.OK
    assert health(p) == 200 and p.proc.poll() is None, "the prefill node died"
    out = p.client().completions.create(model="tiny", prompt="still serving?", **GREEDY)
    assert out.usage.completion_tokens == 16
    p.wait_blocks_free()
