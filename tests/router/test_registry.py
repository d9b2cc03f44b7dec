"""Which nodes a router lets join: one tokenizer, one model and KV layout, and prefill/decode
nodes of one tensor-parallel size (prefill rank r pushes its KV shard to decode rank r)."""

from __future__ import annotations

import asyncio

from pdserve.proto import pdserve_pb2 as pb
from pdserve.router.registry import Registry


def info(node_id: str, role: str, tp_size: int = 1, **kw) -> pb.NodeInfo:
    fields = dict(node_id=node_id, role=role, tp_size=tp_size, tokenizer_fingerprint="tok",
                  model_fingerprint="model/none", block_size=64, kv_dtype="float32")  # fmt: skip
    return pb.NodeInfo(**{**fields, **kw})


def test_prefill_and_decode_nodes_must_share_a_tp_size():
    async def run() -> list[str]:
        reg = Registry("tok")
        out = [
            reg.add("127.0.0.1:1", info("p", "prefill", 2), static=False),
            reg.add("127.0.0.1:2", info("d1", "decode", 1), static=False),
            reg.add("127.0.0.1:3", info("d2", "decode", 2), static=False),
            reg.add("127.0.0.1:4", info("m", "mixed", 4), static=False),  # never pairs
            reg.add("127.0.0.1:1", info("p", "prefill", 2), static=False),  # re-registers
        ]
        for node in reg.nodes.values():
            await node.channel.close()
        return out

    p, d1, d2, m, again = asyncio.run(run())
    assert p == d2 == m == again == ""
    assert "tensor-parallel size 1 differs from prefill node 127.0.0.1:1's 2" in d1


def test_other_mismatches_are_refused_too():
    reg = Registry("tok")
    assert "tokenizer" in reg.check(info("x", "decode", tokenizer_fingerprint="other"))
    reg.reference = info("p", "prefill")
    assert "model_fingerprint" in reg.check(info("q", "decode", model_fingerprint="m/wint4"))
    assert "block_size" in reg.check(info("q", "decode", block_size=16))
