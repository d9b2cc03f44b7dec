"""A prefill node refuses a `Prefill` whose KV destination carries a malformed CUDA IPC handle
with INVALID_ARGUMENT and a message saying what is wrong, and keeps serving."""

from __future__ import annotations

import grpc
import pytest

from pdserve.proto import pdserve_pb2 as pb
from tests.integration.test_mixed_node import GREEDY
from tests.integration.test_pd_faults_protocol import COMMON, GREEDY_PB, RPC_TIMEOUT_S, stub


@pytest.mark.parametrize("size", [63, 65])
def test_prefill_rejects_a_malformed_cuda_ipc_handle(node_factory, size):
    p = node_factory("--splitwise-role", "prefill", *COMMON)
    info = stub(p).GetInfo(pb.InfoRequest())
    dest = pb.KVDestination(rank=0, zmq_endpoint="tcp://127.0.0.1:9", block_ids=[1, 2, 3],
                            host_id=info.host_id, pool_blocks=64, cuda_ipc_handle=b"\1" * size,
                            cuda_ipc_nbytes=1 << 20)  # fmt: skip
    req = pb.PrefillRequest(request_id="bad-ipc", transfer_id="bad-ipc/1", params=GREEDY_PB,
                            prompt_token_ids=list(range(10, 50)), destinations=[dest],
                            kv_dtype=info.kv_dtype, block_size=info.block_size)  # fmt: skip
    with pytest.raises(grpc.RpcError) as e:
        stub(p).Prefill(req, timeout=RPC_TIMEOUT_S)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"rank 0's cuda_ipc_handle: Value error, a CUDA IPC memory handle is 64 bytes, " \
           f"got {size}" in e.value.details()  # fmt: skip
    out = p.client().completions.create(model="tiny", prompt="still serving?", **GREEDY)
    assert out.usage.completion_tokens == 16
    p.wait_blocks_free()
