"""Disaggregated serving with real processes: a decode node with --innode-prefill-ports in front
of a prefill node gives exactly a mixed node's greedy tokens, over shared memory and ZeroMQ."""

from __future__ import annotations

import pytest

from tests.integration.test_mixed_node import GREEDY, PROMPTS, complete_all

COMMON = ("--block-size", "16", "--max-num-seqs", "64", "--num-gpu-blocks-override", "512")


@pytest.fixture(scope="module")
def mixed_outputs(node) -> list[str]:
    return complete_all(node, PROMPTS[:24])


def one_p_one_d(node_factory, protocol: str):
    # pools of different sizes: shared memory must be mapped with the decode pool's shape
    prefill = node_factory("--splitwise-role", "prefill", "--cache-transfer-protocol", protocol,
                           *COMMON[:-1], "300")  # fmt: skip
    decode = node_factory("--splitwise-role", "decode", "--innode-prefill-ports",
                          str(prefill.engine_port), *COMMON)  # fmt: skip
    return prefill, decode


@pytest.mark.parametrize("protocol", ["ipc,zmq", "zmq"], ids=["shm", "zmq"])
def test_innode_1p1d_matches_mixed(node_factory, mixed_outputs, protocol):
    prefill, decode = one_p_one_d(node_factory, protocol)
    assert complete_all(decode, PROMPTS[:24]) == mixed_outputs
    assert decode.metric("kv_bytes_received_total") > 0
    assert decode.metric("pd_fallback_total") == 0
    assert prefill.metric("kv_bytes_sent_total") == decode.metric("kv_bytes_received_total")
    transport = "ipc" if protocol.startswith("ipc") else "zmq"
    assert prefill.metric(f'kv_transfers_total{{transport="{transport}"}}') == 24
    decode.wait_blocks_free()
    prefill.wait_blocks_free()


def test_decode_prefix_cache_moves_only_missing_blocks(node_factory):
    prefill, decode = one_p_one_d(node_factory, "zmq")
    client = decode.client()
    long = PROMPTS[-1]  # 480 bytes: 30 blocks of 16
    first = client.completions.create(model="tiny", prompt=long, **GREEDY)
    moved = decode.metric("kv_bytes_received_total")
    again = client.completions.create(model="tiny", prompt=long, **GREEDY)
    assert again.choices[0].text == first.choices[0].text
    assert again.usage.prompt_tokens_details.cached_tokens >= 16 * 29
    assert decode.metric("kv_bytes_received_total") - moved < moved / 10  # only the last block


def test_abort_rpc_ends_running_calls_and_frees_blocks(node_factory):
    """`Node.Abort` ends a running Generate (and the Prefill it waits on) promptly, instead of
    leaving the callers waiting, and only answers once the engines hold nothing of it."""
    import asyncio

    import grpc

    from pdserve.engine.sampling_params import SamplingParams
    from pdserve.node.proto_convert import params_to_proto
    from pdserve.proto import pdserve_pb2 as pb
    from pdserve.proto import pdserve_pb2_grpc as pb_grpc

    prefill, decode = one_p_one_d(node_factory, "ipc,zmq")
    params = params_to_proto(SamplingParams(max_tokens=1800, ignore_eos=True, temperature=0))

    async def run() -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{decode.grpc_port}") as ch:
            stub = pb_grpc.NodeStub(ch)
            call = stub.Generate(pb.GenerateRequest(
                request_id="ab", prompt_token_ids=list(range(8, 200)), params=params,
                prefill_node=f"127.0.0.1:{prefill.grpc_port}"), timeout=60)  # fmt: skip
            await call.read()  # the first token: decoding has started
            reply = await stub.Abort(pb.AbortRequest(request_ids=["ab"]), timeout=10)
            assert reply.aborted == 1
            try:
                while await asyncio.wait_for(call.read(), 10) != grpc.aio.EOF:
                    pass
            except grpc.aio.AioRpcError as e:
                return e.code()
            return grpc.StatusCode.OK

    assert asyncio.run(run()) == grpc.StatusCode.ABORTED
    decode.wait_blocks_free()
    prefill.wait_blocks_free()


def test_quantized_1p1d_matches_a_quantized_mixed_node(node_factory):
    """--quantization wint4 on every node: the disaggregated tokens are the quantized model's."""
    quant = ("--quantization", "wint4")
    mixed = node_factory(*COMMON, *quant)
    prefill = node_factory("--splitwise-role", "prefill", *COMMON, *quant)
    decode = node_factory("--splitwise-role", "decode", "--innode-prefill-ports",
                          str(prefill.engine_port), *COMMON, *quant)  # fmt: skip
    want = complete_all(mixed, PROMPTS[:8])
    assert complete_all(decode, PROMPTS[:8]) == want
    assert decode.metric("pd_fallback_total") == 0
