"""The gRPC wire format: committed generated modules are current and work over a real channel."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
GENERATED = tuple(f"{name}{suffix}" for name in ("pdserve_pb2", "health_pb2")
                  for suffix in (".py", ".pyi", "_grpc.py"))  # fmt: skip
MAX_RECEIVE_BYTES = 1 << 20
DEADLINE_S = 10.0


def test_generated_modules_are_current(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="needs grpcio-tools (test extra)")
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(["bash", "scripts/gen_proto.sh", str(tmp_path)], cwd=ROOT, env=env, check=True)
    for name in GENERATED:
        committed = (ROOT / "pdserve" / "proto" / name).read_bytes()
        assert (tmp_path / name).read_bytes() == committed, (
            f"pdserve/proto/{name} is stale: run scripts/gen_proto.sh with the grpcio-tools "
            "version pinned in pyproject.toml's test extra"
        )


def test_generated_code_needs_no_newer_runtime() -> None:
    # Newer protoc emits a runtime version guard (pb2) or a grpcio version check (_grpc) that
    # refuses older runtimes; pyproject's lower bounds for protobuf and grpcio assume neither.
    proto_dir = ROOT / "pdserve" / "proto"
    assert "_runtime_version" not in (proto_dir / "pdserve_pb2.py").read_text()
    assert "GRPC_GENERATED_VERSION" not in (proto_dir / "pdserve_pb2_grpc.py").read_text()


def make_node_info() -> pb.NodeInfo:
    return pb.NodeInfo(
        node_id="decode-0",
        role="decode",
        host="127.0.0.1",
        advertise_host="10.0.0.7",
        http_port=8000,
        pd_comm_port=8004,
        engine_worker_queue_port=8002,
        cache_queue_port=8003,
        tp_size=2,
        backend="numpy",
        block_size=64,
        kv_dtype="bfloat16",
        model_fingerprint="m" * 64,
        tokenizer_fingerprint="t" * 64,
        num_blocks=4096,
        host_id="host-a",
        max_model_len=131072,
    )


def make_generate_request(request_id: str, **params: object) -> pb.GenerateRequest:
    sampling = {"temperature": 0.7, "top_p": 0.9, "top_k": 20, "max_tokens": 3, **params}
    return pb.GenerateRequest(
        request_id=request_id,
        prompt_token_ids=[1, 2, 2**31 - 1],
        params=pb.SamplingParams(stop_token_ids=[5, 6], **sampling),
        eos_token_ids=[2],
        prefill_node="127.0.0.1:9004",
        fallback_prefill_nodes=["127.0.0.1:9104", "127.0.0.1:9204"],
    )


class FakeNode(pb_grpc.NodeServicer):
    """Answers GetInfo and streams one token per chunk (ids 100, 101, ...) up to max_tokens."""

    def __init__(self) -> None:
        self.received: list[pb.GenerateRequest] = []

    async def GetInfo(
        self, request: pb.InfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.NodeInfo:
        return make_node_info()

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.TokenChunk]:
        self.received.append(request)
        n = request.params.max_tokens
        for i in range(n):
            yield pb.TokenChunk(
                token_ids=[100 + i],
                logprobs=[-0.5 * i],
                top_logprobs=[pb.TokenLogprobs(top=[pb.TopLogprob(token_id=7, logprob=-1.25)])],
                finish_reason="length" if i == n - 1 else "",
                num_prompt_tokens=len(request.prompt_token_ids),
                num_cached_tokens=1,
                kv_bytes_received=2**40,
                pd_fallback=True,
            )


async def _round_trip() -> None:
    servicer = FakeNode()
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_RECEIVE_BYTES)])
    pb_grpc.add_NodeServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.NodeStub(channel)

            assert await stub.GetInfo(pb.InfoRequest(), timeout=DEADLINE_S) == make_node_info()

            seeded = make_generate_request("r-seed0", seed=0, logprobs=0)
            chunks = [c async for c in stub.Generate(seeded, timeout=DEADLINE_S)]
            unseeded = make_generate_request("r-noseed")
            [c async for c in stub.Generate(unseeded, timeout=DEADLINE_S)]

            got_seeded, got_unseeded = servicer.received
            assert got_seeded == seeded and got_unseeded == unseeded
            assert got_seeded.params.HasField("seed") and got_seeded.params.seed == 0
            assert got_seeded.params.HasField("logprobs") and got_seeded.params.logprobs == 0
            assert not got_unseeded.params.HasField("seed")
            assert not got_unseeded.params.HasField("logprobs")
            assert got_seeded.params.top_p == 0.9  # double: exact, not 0.899999976
            assert list(got_seeded.prompt_token_ids) == [1, 2, 2**31 - 1]

            assert [list(c.token_ids) for c in chunks] == [[100], [101], [102]]
            assert [c.finish_reason for c in chunks] == ["", "", "length"]
            assert [list(c.logprobs) for c in chunks] == [[0.0], [-0.5], [-1.0]]
            last = chunks[-1]
            assert last.top_logprobs[0].top[0].token_id == 7
            assert last.top_logprobs[0].top[0].logprob == -1.25
            assert (last.num_prompt_tokens, last.num_cached_tokens) == (3, 1)
            assert last.kv_bytes_received == 2**40 and last.pd_fallback

            # A prompt whose encoding is over the server's receive limit is refused, not read.
            huge = make_generate_request("r-huge")
            huge.prompt_token_ids.extend([2**20] * (MAX_RECEIVE_BYTES // 3))
            assert huge.ByteSize() > MAX_RECEIVE_BYTES
            with pytest.raises(grpc.aio.AioRpcError) as err:
                [c async for c in stub.Generate(huge, timeout=DEADLINE_S)]
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert len(servicer.received) == 2
    finally:
        await server.stop(grace=None)


def test_node_round_trip_over_loopback() -> None:
    asyncio.run(_round_trip())
