"""Faults in disaggregated serving (DESIGN.md section 2, failure rules): a prefill or decode node
killed mid-request, clients hanging up mid-prefill and mid-decode, and broken KV transfers from
the PDSERVE_KV_FAULT injector. Real processes on loopback ports; every wait is bounded.

Prefill nodes run with a tiny --max-num-batched-tokens so that a long prompt takes many steps and
a fault lands while its KV is still moving.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import openai
import pytest

from tests.integration.conftest import Node, http
from tests.integration.test_faults import ERROR_FIELDS, READ_TIMEOUT_S, health, raw_post, wait_until
from tests.integration.test_mixed_node import GREEDY, PROMPTS, complete_all, words
from tests.integration.test_router import addr, nodes_of, start_router

COMMON = ("--block-size", "16", "--max-num-seqs", "64", "--num-gpu-blocks-override", "1024")
SLOW_PREFILL = ("--max-num-batched-tokens", "16")  # a 1000-token prompt takes ~60 steps
LONG = [words(1000 + i, 200) for i in range(12)]  # 999 bytes (tokens) each
JSON_HEADERS = {"Content-Type": "application/json"}
FAULTS = {"PDSERVE_KV_FAULT": "drop=0.05,corrupt=0.05,seed=1"}
RECOMPUTED = "recomputing the prompt of"  # the decode node's log line for each local fallback


@dataclass
class Cluster:
    """Nodes and routers of one test; their logs are shown when the test fails."""

    node_factory: Callable[..., Node]
    nodes: list[Node] = field(default_factory=list)
    routers: list[Node] = field(default_factory=list)

    def node(self, *args: str, **kw: Any) -> Node:
        self.nodes.append(self.node_factory(*args, **kw))
        return self.nodes[-1]

    def router(self, prefill: list[Node], decode: list[Node]) -> Node:
        router = start_router("--prefill-nodes", ",".join(map(addr, prefill)),
                              "--decode-nodes", ",".join(map(addr, decode)))  # fmt: skip
        self.routers.append(router)
        return router


@pytest.fixture
def cluster(node_factory) -> Iterator[Cluster]:
    c = Cluster(node_factory)
    yield c
    for r in c.routers:
        r.stop(signal.SIGKILL)
    for n in c.nodes:
        if n.log_path is not None:
            lines = [ln for ln in n.log().splitlines() if "aiohttp.access" not in ln]
            sys.stderr.write(f"--- node :{n.grpc_port} ---\n" + "\n".join(lines[-60:]) + "\n")


@pytest.fixture(scope="module")
def mixed_long(node: Node) -> dict[str, str]:
    """What a mixed node answers to each long prompt (greedy)."""
    return dict(zip(LONG, complete_all(node, LONG)))


async def until(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    """cond()'s first truthy value, polled without blocking the event loop for long."""
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            pytest.fail(f"{what} (waited {timeout:g} s)")
        await asyncio.sleep(0.05)
    return value


async def complete(client: openai.AsyncOpenAI, prompt: str) -> str:
    out = await client.completions.create(model="tiny", prompt=prompt, **GREEDY)
    return out.choices[0].text


def busy(*nodes: Node) -> Node | None:
    """The first node computing or queueing a request."""
    for n in nodes:
        if n.metric("num_requests_running") + n.metric("num_requests_waiting") > 0:
            return n
    return None


def healthy_addrs(router: Node) -> set[str]:
    return {n["addr"] for n in nodes_of(router) if n["healthy"]}


def post_completion(node: Node, prompt: str = "hello") -> tuple[int, dict]:
    body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 4}).encode()
    status, text = http("POST", node.url + "/v1/completions", body, JSON_HEADERS)
    return status, json.loads(text)


def assert_503(err: BaseException) -> None:
    assert isinstance(err, openai.InternalServerError), repr(err)
    assert err.status_code == 503, err
    assert isinstance(err.body, dict) and set(err.body) == ERROR_FIELDS, err.body


# --- A prefill node dies ----------------------------------------------------------------------


async def kill_mid_prefill(router: Node, prompts: list[str], prefill: list[Node],
                           then: list[str] | None = None) -> tuple[Node, list[str]]:  # fmt: skip
    """Send the prompts, SIGKILL the first prefill node that takes one, send `then` right
    away; the node killed and every answer."""
    async with router.async_client() as client:
        tasks = [asyncio.create_task(complete(client, prompt)) for prompt in prompts]
        victim = await until(lambda: busy(*prefill), 10, "no prefill node ever took a request")
        victim.proc.kill()
        tasks += [asyncio.create_task(complete(client, prompt)) for prompt in then or []]
        return victim, await asyncio.wait_for(asyncio.gather(*tasks), 60)


def test_prefill_nodes_killed_mid_prefill_requests_still_complete(cluster, mixed_long):
    ps = [cluster.node("--splitwise-role", "prefill", *SLOW_PREFILL, *COMMON) for _ in range(2)]
    d = cluster.node("--splitwise-role", "decode", *COMMON)
    router = cluster.router(ps, [d])

    # one of two prefill nodes dies: its requests are retried on the other one; requests sent
    # right after (while the router may still pick the dead node) too
    victim, out = asyncio.run(kill_mid_prefill(router, LONG[:8], ps, then=LONG[:4]))
    assert out == [mixed_long[p] for p in LONG[:8] + LONG[:4]]
    log = d.log()
    assert f"on {addr(victim)} failed" in log, "the decode node never logged the failed prefill"
    assert d.metric("pd_fallback_total") == log.count(RECOMPUTED)
    survivor = ps[1 - ps.index(victim)]
    assert survivor.metric("kv_bytes_sent_total") > 0
    survivor.wait_blocks_free()

    # the last prefill node dies too: nowhere to retry, so the decode node recomputes
    wait_until(lambda: addr(victim) not in healthy_addrs(router), 10, "dead node not ejected")
    _, out = asyncio.run(kill_mid_prefill(router, LONG[8:], [survivor]))
    assert out == [mixed_long[p] for p in LONG[8:]]
    log = d.log()
    assert f"on {addr(survivor)} failed" in log
    assert d.metric("pd_fallback_total") == log.count(RECOMPUTED) > 0
    assert health(d) == 200 and d.proc.poll() is None
    assert addr(d) in healthy_addrs(router), "a prefill node's death made the decode node unhealthy"
    d.wait_blocks_free()


def test_prefill_node_killed_with_fallback_fail_gives_503(cluster, mixed_long):
    p = cluster.node("--splitwise-role", "prefill", *SLOW_PREFILL, *COMMON)
    d = cluster.node("--splitwise-role", "decode", "--pd-fallback", "fail", *COMMON)
    router = cluster.router([p], [d])

    async def scenario() -> tuple[list[Any], bool]:
        async with router.async_client() as client:
            tasks = [asyncio.create_task(complete(client, prompt)) for prompt in LONG[:6]]
            await until(lambda: busy(p), 10, "the prefill node never took a request")
            p.proc.kill()
            results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
            return results, addr(d) in healthy_addrs(router)

    results, decode_healthy = asyncio.run(scenario())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors, "no request was in flight on the killed prefill node"
    for prompt, r in zip(LONG, results):
        if isinstance(r, BaseException):
            assert_503(r)
        else:
            assert r == mixed_long[prompt]
    # with no prefill node at all, requests fail at once and cleanly
    for _ in range(3):
        start = time.monotonic()
        status, body = post_completion(router)
        assert status == 503 and set(body["error"]) == ERROR_FIELDS, body
        assert time.monotonic() - start < 10
    assert health(d) == 200
    d.wait_blocks_free()
    # a prefill node back at the same address: served again
    cluster.node("--splitwise-role", "prefill", *COMMON, "--pd-comm-port", str(p.grpc_port))
    wait_until(lambda: post_completion(router)[0] == 200, 20, "never served again")
    d.wait_blocks_free()
    # The decode node did nothing wrong: the router must not count the prefill node's death
    # against it (DESIGN.md: a prefill node's death never makes a decode node unhealthy), nor
    # tell clients that no decode node is left.
    assert decode_healthy, "the router marked the decode node unhealthy"
    messages = [e.message for e in errors]
    assert all("prefill" in m for m in messages), messages


# --- A decode node dies -----------------------------------------------------------------------


async def stream_outcome(client: openai.AsyncOpenAI, prompt: str, started: asyncio.Event) -> str:
    try:
        stream = await client.completions.create(model="tiny", prompt=prompt, max_tokens=1000,
                                                 temperature=0, stream=True,
                                                 extra_body={"ignore_eos": True})  # fmt: skip
        started.set()
        while True:
            await asyncio.wait_for(stream.__anext__(), READ_TIMEOUT_S)
    except StopAsyncIteration:
        return "finished"
    except asyncio.TimeoutError:
        return "hang"
    except openai.APIConnectionError as e:
        return f"broken stream: {e!r}"
    except openai.InternalServerError as e:
        return "http 503" if e.status_code == 503 else f"http {e.status_code}"
    except openai.APIError:
        return "error event" if started.is_set() else "error before start"


def test_decode_node_killed_mid_stream(cluster):
    p = cluster.node("--splitwise-role", "prefill", *SLOW_PREFILL, *COMMON)
    d = cluster.node("--splitwise-role", "decode", *COMMON)
    router = cluster.router([p], [d])

    async def scenario() -> list[str]:
        async with router.async_client() as client:
            started = asyncio.Event()
            tasks = [asyncio.create_task(stream_outcome(client, prompt, started))
                     for prompt in LONG[:4]]  # fmt: skip
            await asyncio.wait_for(started.wait(), 20)
            d.proc.kill()
            return await asyncio.wait_for(asyncio.gather(*tasks), 30)

    outcomes = asyncio.run(scenario())
    assert "error event" in outcomes, outcomes  # the stream that had started
    assert set(outcomes) <= {"error event", "http 503"}, outcomes
    assert health(router) == 200
    status, body = post_completion(router)
    assert status == 503 and set(body["error"]) == ERROR_FIELDS, body
    # the prefill node was pushing KV to the dead node: it must shrug that off and keep serving
    status, body = post_completion(p)
    assert status == 200, body
    p.wait_blocks_free()
    assert p.proc.poll() is None and health(p) == 200


# --- Clients hanging up -----------------------------------------------------------------------


def test_client_disconnect_aborts_on_both_nodes(cluster):
    p = cluster.node("--splitwise-role", "prefill", "--max-num-batched-tokens", "1", *COMMON)
    d = cluster.node("--splitwise-role", "decode", *COMMON)
    router = cluster.router([p], [d])
    # 1900-token prompts, computed one token per step: ~1 s each, seconds in all
    requests = [raw_post("/v1/completions", {"model": "tiny", "prompt": words(2000 + i, 380),
                                             "max_tokens": 16, "stream": True})
                for i in range(12)]  # fmt: skip

    # gone at once, the abort racing the request through router, decode and prefill node
    for req in requests[:8]:
        with socket.create_connection(("127.0.0.1", router.port)) as s:
            s.sendall(req)
    time.sleep(1.0)
    p.wait_blocks_free(timeout=5)
    d.wait_blocks_free(timeout=5)

    # gone while the prefill node computes (response headers only come with the first token)
    socks = [socket.create_connection(("127.0.0.1", router.port)) for _ in requests[8:]]
    for s, req in zip(socks, requests[8:]):
        s.sendall(req)
    wait_until(lambda: busy(p) is not None, 10, "the prefill node never took a request")
    for s in socks:
        s.close()
    p.wait_blocks_free(timeout=3)
    d.wait_blocks_free(timeout=3)
    assert p.metric("kv_bytes_sent_total") == 0, "a prefill ran on for a client that had gone"

    # gone mid-decode
    async def hang_up_mid_decode() -> None:
        async with router.async_client() as client:
            streams = [await client.completions.create(
                model="tiny", prompt=f"story {i}", max_tokens=1900, stream=True,
                extra_body={"ignore_eos": True},
            ) for i in range(4)]  # fmt: skip
            for stream in streams:
                for _ in range(3):
                    await asyncio.wait_for(stream.__anext__(), READ_TIMEOUT_S)
            for stream in streams:
                await stream.close()

    asyncio.run(hang_up_mid_decode())
    d.wait_blocks_free(timeout=3)
    p.wait_blocks_free(timeout=3)
    assert d.metric("generation_tokens_total") == 0, "a stream ran to its end after its client left"


# --- Broken transfers -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_outputs(node: Node) -> list[str]:
    return complete_all(node, PROMPTS[:24])


@pytest.mark.parametrize(("protocol", "prefill_args"), [
    ("ipc,zmq", ()),
    ("zmq", ()),
    ("zmq", SLOW_PREFILL),  # a prompt's frames spread over many steps
], ids=["shm", "zmq", "zmq-chunked"])  # fmt: skip
def test_injected_kv_faults_fall_back_and_are_counted(cluster, mixed_outputs, protocol,
                                                      prefill_args):  # fmt: skip
    p = cluster.node("--splitwise-role", "prefill", "--cache-transfer-protocol", protocol,
                     *prefill_args, *COMMON, env=FAULTS)  # fmt: skip
    d = cluster.node("--splitwise-role", "decode", "--kv-checksum", "--innode-prefill-ports",
                     str(p.engine_port), *COMMON)  # fmt: skip
    assert complete_all(d, PROMPTS[:24]) == mixed_outputs
    # broken transfers must cost the prefill node nothing
    assert p.proc.poll() is None and health(p) == 200, "the prefill node died"
    log = d.log()
    fallbacks = d.metric("pd_fallback_total")
    assert fallbacks > 0, "5% dropped and 5% corrupted frames, yet no fallback was counted"
    assert fallbacks == log.count(RECOMPUTED), "the counter and the log disagree"
    assert d.metric("kv_bytes_received_total") > 0, "no transfer got through"
    # which fault ends a transfer first depends on timing (a failed transfer stops drawing
    # faults), so either check may be the one that caught it
    assert "checksum" in log or "incomplete" in log, "no broken frame was caught"
    d.wait_blocks_free()
    p.wait_blocks_free()
