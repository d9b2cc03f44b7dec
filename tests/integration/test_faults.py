"""Faults around a running node: overload, clients hanging up, a dying engine, a killed node and
shutdown signals. Real processes and sockets; every wait is bounded."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionChunk

from tests.integration.conftest import Node, http

READ_TIMEOUT_S = 10.0  # one stream read; longer means the node hangs
CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "Tell me a long story."}]
JSON = {"Content-Type": "application/json"}
ERROR_FIELDS = {"message", "type", "param", "code"}

StartNode = Callable[..., Node]
Stream = openai.AsyncStream[ChatCompletionChunk]


def chat_body(max_tokens: int, **kw: Any) -> dict[str, Any]:
    """A chat request that generates exactly max_tokens tokens (eos is ignored)."""
    return {"model": "tiny", "messages": USER, "max_tokens": max_tokens, "ignore_eos": True, **kw}


def long_chat(max_tokens: int, **kw: Any) -> dict[str, Any]:
    """chat_body as keyword arguments of the openai client's `create`."""
    return {"model": "tiny", "messages": USER, "max_tokens": max_tokens,
            "extra_body": {"ignore_eos": True}, **kw}  # fmt: skip


def raw_post(path: str, body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n")  # fmt: skip
    return head.encode() + data


def engine_pid(node: Node) -> int:
    """The node's engine process: its only child."""
    pid = node.proc.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    assert len(children) == 1, f"expected the engine as the node's only child, got {children}"
    return int(children[0])


def engine_alive(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return b"pdserve.engine.engine_proc" in cmdline and state != "Z"


def health(node: Node) -> int | None:
    """/health's status, or None when nothing listens any more."""
    try:
        return http("GET", node.url + "/health")[0]
    except OSError:
        return None


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} (waited {timeout:g} s)")
        time.sleep(0.05)


@pytest.fixture
def start(node_factory: StartNode) -> Iterator[StartNode]:
    """node_factory, plus a safety net: engines still alive at teardown are killed, and a failed
    test shows the node's log."""
    engines: list[int] = []
    nodes: list[Node] = []

    def make(*args: str, **kw: Any) -> Node:
        node = node_factory(*args, **kw)
        nodes.append(node)
        engines.append(engine_pid(node))
        return node

    yield make
    for node in nodes:
        sys.stderr.write(node.log())  # shown by pytest when the test failed
    for pid in engines:
        if engine_alive(pid):
            os.kill(pid, signal.SIGKILL)


async def next_chunk(stream: Stream) -> ChatCompletionChunk:
    return await asyncio.wait_for(stream.__anext__(), READ_TIMEOUT_S)


async def read_all(stream: Stream) -> list[ChatCompletionChunk]:
    chunks = []
    while True:
        try:
            chunks.append(await next_chunk(stream))
        except StopAsyncIteration:
            return chunks


def finish_reasons(chunks: list[ChatCompletionChunk]) -> list[str]:
    return [c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason]


def burst_errors(node: Node, n: int) -> list[BaseException]:
    """Send n short requests at once; the errors they got."""

    async def scenario() -> list[Any]:
        async with node.async_client() as client:
            return await asyncio.gather(
                *(client.chat.completions.create(**long_chat(4)) for _ in range(n)),
                return_exceptions=True,
            )

    return [r for r in asyncio.run(scenario()) if isinstance(r, BaseException)]


# --- Overload ---------------------------------------------------------------------------------


def test_requests_over_max_concurrency_get_429(start: StartNode) -> None:
    node = start("--max-concurrency", "2", "--max-model-len", "4096")

    async def scenario() -> tuple[list[Any], list[list[ChatCompletionChunk]]]:
        async with node.async_client() as client:
            admitted = [await client.chat.completions.create(
                **long_chat(600), stream=True, stream_options={"include_usage": True}
            ) for _ in range(2)]  # fmt: skip
            for stream in admitted:
                await next_chunk(stream)
            extra = await asyncio.gather(
                *(client.chat.completions.create(**long_chat(600), stream=True) for _ in range(3)),
                return_exceptions=True,
            )
            for stream in extra:
                if isinstance(stream, openai.AsyncStream):
                    await stream.close()
            return extra, [await read_all(stream) for stream in admitted]

    extra, finished = asyncio.run(scenario())
    for err in extra:
        assert isinstance(err, openai.RateLimitError), err
        assert err.status_code == 429
        assert isinstance(err.body, dict) and set(err.body) == ERROR_FIELDS, err.body
        assert (err.type, err.code) == ("rate_limit_error", "rate_limit_exceeded")
    for chunks in finished:
        assert finish_reasons(chunks) == ["length"]
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 600
    client = node.client()
    with pytest.raises(openai.BadRequestError) as exc:  # can never fit, so not a 429
        client.chat.completions.create(**long_chat(4), n=3)
    assert exc.value.param == "n"
    assert not burst_errors(node, 2), "the slots of finished streams did not come back"


# --- Clients hanging up -----------------------------------------------------------------------


def test_cancelled_streams_give_back_blocks_and_slots(start: StartNode) -> None:
    limit = 32
    node = start("--max-num-seqs", "64", "--num-gpu-blocks-override", "512",
                 "--block-size", "16", "--max-concurrency", str(limit))  # fmt: skip
    rng = random.Random(1234)
    plan = [rng.randint(0, 12) for _ in range(100)]  # chunks each client reads before hanging up

    async def hang_up(client: openai.AsyncOpenAI, slots: asyncio.Semaphore, k: int) -> None:
        async with slots:
            # Unless hanging up aborts them, 100 x 2000 tokens would take minutes.
            stream = await client.chat.completions.create(**long_chat(2000), stream=True)
            try:
                for _ in range(k):
                    await next_chunk(stream)
            finally:
                await stream.close()

    async def scenario() -> None:
        slots = asyncio.Semaphore(8)
        async with node.async_client() as client:
            await asyncio.gather(*(hang_up(client, slots, k) for k in plan))

    asyncio.run(scenario())
    node.wait_blocks_free()
    errors = burst_errors(node, limit)
    assert not errors, f"concurrency slots leaked by cancelled streams: {errors[0]}"


def test_clients_gone_before_first_token_give_back_slots(start: StartNode) -> None:
    limit = 4
    node = start("--max-concurrency", str(limit))
    request = raw_post(CHAT, chat_body(2000, stream=True))
    for _ in range(2 * limit):
        # Response headers go out with the first token, so these clients never see one.
        with socket.create_connection(("127.0.0.1", node.port)) as s:
            s.sendall(request)
    node.wait_blocks_free()
    errors = burst_errors(node, limit)
    assert not errors, f"slots leaked by clients that hung up before the first token: {errors[0]}"


def test_non_streaming_client_gone_stops_generation(start: StartNode) -> None:
    node = start("--max-model-len", "4096")
    with socket.create_connection(("127.0.0.1", node.port)) as s:
        s.sendall(raw_post(CHAT, chat_body(3000)))
        wait_until(lambda: node.metric("num_requests_running") == 1, 5, "the request never ran")
    wait_until(lambda: node.metric("num_requests_running") == 0, 2,
               "still generating for a client that hung up")  # fmt: skip
    node.wait_blocks_free()


# --- Engine or node killed --------------------------------------------------------------------


def test_engine_killed_mid_stream_fails_streams_and_node(start: StartNode) -> None:
    node = start("--max-model-len", "4096")
    engine = engine_pid(node)

    async def outcome(stream: Stream) -> str:
        try:
            chunks = await read_all(stream)
        except openai.APIConnectionError as e:
            return f"broken stream: {e!r}"
        except openai.APIError as e:
            return f"error event: {e.message}"
        return f"finished normally: {finish_reasons(chunks)}"

    async def scenario() -> list[str]:
        async with node.async_client() as client:
            streams = [await client.chat.completions.create(**long_chat(2000), stream=True)
                       for _ in range(3)]  # fmt: skip
            for stream in streams:
                await next_chunk(stream)
            os.kill(engine, signal.SIGKILL)
            return list(await asyncio.gather(*(outcome(s) for s in streams)))

    outcomes = asyncio.run(scenario())
    assert all(not o.startswith("finished") for o in outcomes), outcomes
    assert health(node) in (503, None)  # unhealthy, or already gone
    try:
        code = node.proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pytest.fail("the node outlived its engine by more than 5 s")
    assert code != 0


def test_engine_exits_when_its_node_is_killed(start: StartNode) -> None:
    node = start("--max-model-len", "4096")
    engine = engine_pid(node)
    stream = node.client().chat.completions.create(**long_chat(3000), stream=True)
    next(iter(stream))
    node.proc.kill()
    node.proc.wait()
    # An orphaned engine keeps its memory and --engine-worker-queue-port: no restart possible.
    wait_until(lambda: not engine_alive(engine), 3, "the engine outlived its killed node")


# --- Graceful shutdown ------------------------------------------------------------------------


@pytest.mark.parametrize(("sig", "whole_group"), [
    (signal.SIGTERM, False),  # kill <node>, docker stop, Kubernetes
    (signal.SIGINT, True),  # Ctrl-C in a terminal signals the foreground process group
    (signal.SIGTERM, True),  # systemctl stop, kill -TERM -<pgid>
], ids=["sigterm-node", "sigint-group", "sigterm-group"])  # fmt: skip
def test_shutdown_signal_finishes_in_flight_stream(start: StartNode, sig: int,
                                                   whole_group: bool) -> None:  # fmt: skip
    node = start("--max-model-len", "4096", "--timeout-graceful-shutdown", "10")
    targets = [node.proc.pid] + ([engine_pid(node)] if whole_group else [])
    max_tokens = 1500
    stream = node.client().chat.completions.create(
        **long_chat(max_tokens), stream=True, stream_options={"include_usage": True}
    )
    chunks = iter(stream)
    seen = [next(chunks), next(chunks)]
    for pid in targets:
        os.kill(pid, sig)
    wait_until(lambda: health(node) != 200, 5, "/health still 200 after the signal")
    assert health(node) == 503
    status, text = http("POST", node.url + CHAT, json.dumps(chat_body(4)).encode(), JSON)
    assert status == 503, text
    assert set(json.loads(text)["error"]) == ERROR_FIELDS, text
    try:
        seen += list(chunks)
    except openai.APIError as e:
        pytest.fail(f"the in-flight stream failed during shutdown: {e.message}")
    assert finish_reasons(seen) == ["length"]
    assert seen[-1].usage is not None and seen[-1].usage.completion_tokens == max_tokens
    assert node.proc.wait(timeout=15) == 0


def test_draining_503_carries_the_service_unavailable_code(start: StartNode) -> None:
    """Clients key on the code: a draining node says what a dead engine says."""
    node = start("--timeout-graceful-shutdown", "10")
    stream = node.client().chat.completions.create(**long_chat(600), stream=True)
    next(iter(stream))  # keeps the node draining while we ask
    node.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: health(node) != 200, 5, "/health still 200 after SIGTERM")
    status, text = http("POST", node.url + CHAT, json.dumps(chat_body(4)).encode(), JSON)
    stream.close()
    assert status == 503, text
    error = json.loads(text)["error"]
    assert (error["type"], error["code"]) == ("server_error", "service_unavailable"), error
