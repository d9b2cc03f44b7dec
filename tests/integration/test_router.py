"""The router in front of real prefill, decode and mixed nodes."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time

import pytest

from tests.integration.conftest import Node, free_ports, http
from tests.integration.test_mixed_node import GREEDY, PROMPTS, complete_all

COMMON = ("--block-size", "16", "--max-num-seqs", "64", "--num-gpu-blocks-override", "512")


def start_router(*args: str) -> Node:
    port, grpc_port, mport = free_ports(3)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pdserve.cli", "router", "--model", "tiny", "--port", str(port),
         "--pd-comm-port", str(grpc_port), "--metrics-port", str(mport), *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    router = Node(proc, port, mport, grpc_port=grpc_port)
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, f"router exited with {proc.returncode}"
        try:
            if http("GET", router.url + "/health")[0] == 200:
                return router
        except OSError:
            pass
        assert time.monotonic() < deadline, "router did not become healthy"
        time.sleep(0.1)


@pytest.fixture
def routers():
    started: list[Node] = []

    def make(*args: str) -> Node:
        started.append(start_router(*args))
        return started[-1]

    yield make
    for r in started:
        r.stop(signal.SIGKILL)


def addr(n: Node) -> str:
    return f"127.0.0.1:{n.grpc_port}"


def nodes_of(router: Node) -> list[dict]:
    return json.loads(http("GET", router.url + "/nodes")[1])["nodes"]


@pytest.fixture(scope="module")
def mixed_outputs(node) -> list[str]:
    return complete_all(node, PROMPTS[:24])


@pytest.mark.parametrize("protocol", ["ipc,zmq", "zmq"], ids=["shm", "zmq"])
def test_router_1p1d_matches_mixed(node_factory, routers, mixed_outputs, protocol):
    p = node_factory("--splitwise-role", "prefill", "--cache-transfer-protocol", protocol, *COMMON)
    d = node_factory("--splitwise-role", "decode", *COMMON)
    router = routers("--prefill-nodes", addr(p), "--decode-nodes", addr(d))
    assert complete_all(router, PROMPTS[:24]) == mixed_outputs
    assert d.metric("kv_bytes_received_total") > 0 and d.metric("pd_fallback_total") == 0
    # streamed through the router too
    text = "".join(c.choices[0].text for c in router.client().completions.create(
        model="tiny", prompt=PROMPTS[3], stream=True, **GREEDY))  # fmt: skip
    assert text == mixed_outputs[3]
    # the router measures what its clients see
    assert router.metric("time_to_first_token_seconds_count") == 25
    assert router.metric('request_success_total{finish_reason="length"}') == 25
    d.wait_blocks_free()
    p.wait_blocks_free()


def test_router_over_mixed_nodes(node_factory, routers, mixed_outputs):
    a, b = node_factory(*COMMON), node_factory(*COMMON)
    router = routers("--mixed-nodes", f"{addr(a)},{addr(b)}")
    assert complete_all(router, PROMPTS[:24]) == mixed_outputs
    assert all(n["served"] > 0 for n in nodes_of(router))


def test_2p2d_under_64_concurrent_streams(node_factory, routers, mixed_outputs):
    ps = [node_factory("--splitwise-role", "prefill", *COMMON) for _ in range(2)]
    ds = [node_factory("--splitwise-role", "decode", *COMMON) for _ in range(2)]
    router = routers("--prefill-nodes", ",".join(map(addr, ps)),
                     "--decode-nodes", ",".join(map(addr, ds)))  # fmt: skip

    async def streams() -> list[str]:
        client = router.async_client()

        async def one(p: str) -> str:
            s = await client.completions.create(model="tiny", prompt=p, stream=True, **GREEDY)
            return "".join([c.choices[0].text async for c in s])

        out = await asyncio.gather(*[one(PROMPTS[i % 24]) for i in range(64)])
        await client.close()
        return out

    out = asyncio.run(streams())
    assert out == [mixed_outputs[i % 24] for i in range(64)]
    assert all(n.metric("kv_bytes_sent_total") > 0 for n in ps), "every prefill node served"
    assert all(n.metric("kv_bytes_received_total") > 0 for n in ds), "every decode node served"
    for n in (*ps, *ds):
        n.wait_blocks_free()


def test_registration_fills_an_empty_router(node_factory):
    port, grpc_port, mport = free_ports(3)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pdserve.cli", "router", "--model", "tiny", "--port", str(port),
         "--pd-comm-port", str(grpc_port), "--metrics-port", str(mport)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    router = Node(proc, port, mport)
    try:
        target = f"127.0.0.1:{grpc_port}"
        p = node_factory("--splitwise-role", "prefill", "--router", target, *COMMON)
        d = node_factory("--splitwise-role", "decode", "--router", target, *COMMON)
        deadline = time.monotonic() + 30
        while True:
            try:
                if http("GET", router.url + "/health")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.1)
        out = router.client().completions.create(model="tiny", prompt=PROMPTS[2], **GREEDY)
        assert out.usage.completion_tokens == 16
        assert {n["role"] for n in nodes_of(router)} == {"prefill", "decode"}
        assert d.metric("kv_bytes_received_total") > 0
        # a node that stops heartbeating is dropped
        p.stop(signal.SIGKILL)
        deadline = time.monotonic() + 15
        while {n["role"] for n in nodes_of(router)} != {"decode"}:
            assert time.monotonic() < deadline, "a silent node was never dropped"
            time.sleep(0.5)
    finally:
        router.stop(signal.SIGTERM)


def test_router_1p1d_with_tensor_parallel_nodes(node_factory, routers, mixed_outputs):
    """TP 2 prefill and decode nodes behind the router, KV over ZeroMQ rank to rank; a TP 1
    decode node that registers later is refused (its ranks would not match the prefill's)."""
    tp2 = ("--tensor-parallel-size", "2")
    p = node_factory("--splitwise-role", "prefill", "--cache-transfer-protocol", "zmq", *tp2,
                     *COMMON)  # fmt: skip
    d = node_factory("--splitwise-role", "decode", *tp2, *COMMON)
    router = routers("--prefill-nodes", addr(p), "--decode-nodes", addr(d))
    assert complete_all(router, PROMPTS[:8]) == mixed_outputs[:8]
    assert d.metric("pd_fallback_total") == 0
    assert p.metric("kv_bytes_sent_total") == d.metric("kv_bytes_received_total") > 0
    router_addr = f"127.0.0.1:{router.grpc_port}"
    late = node_factory("--splitwise-role", "decode", "--router", router_addr, *COMMON)
    deadline = time.monotonic() + 15
    while "refused this node: its tensor-parallel size 1 differs" not in late.log():
        assert time.monotonic() < deadline, late.log()
        time.sleep(0.1)
    assert [n["role"] for n in nodes_of(router)] == ["prefill", "decode"]
    d.wait_blocks_free()
    p.wait_blocks_free()
