"""Bad input: requests over plain HTTP get their status and an OpenAI-style error body (and the
node keeps serving, every KV block back in the pool); bad flags and taken ports stop
`pdserve serve` at once with a message naming the flag."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.integration.conftest import Node, free_ports, http, start_node

KEY = "sk-fault-test"
MAX_MODEL_LEN = 256  # tokens; the tiny model's byte tokenizer makes one token per byte
MAX_BODY = 100_000  # bytes
CHAT, CMPL = "/v1/chat/completions", "/v1/completions"
USER = [{"role": "user", "content": "hi"}]
NUMBER_CONTENT = [{"role": "user", "content": 5}]
IMAGE_CONTENT = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
LONG_CONTENT = [{"role": "user", "content": "x" * MAX_MODEL_LEN}]
TOOLS = [{"type": "function", "function": {"name": "f"}}]
USAGE = {"include_usage": True}


def chat(**fields: Any) -> bytes:
    return json.dumps({"model": "tiny", "messages": USER, **fields}).encode()


def cmpl(**fields: Any) -> bytes:
    return json.dumps({"model": "tiny", "prompt": "hi", **fields}).encode()


def without(body: bytes, name: str) -> bytes:
    fields = json.loads(body)
    del fields[name]
    return json.dumps(fields).encode()


def case(name: str, path: str, body: bytes | None, status: int, param: str | None = None,
         code: str | None = None, method: str = "POST") -> Any:  # fmt: skip
    return pytest.param(method, path, body, status, param, code, id=name)


CASES = [
    # The body is not a JSON object.
    case("invalid-json", CHAT, b'{"messages": [', 400),
    case("json-array", CHAT, b'[{"role": "user", "content": "hi"}]', 400),
    case("invalid-utf8", CHAT, b"\xff\xfe{}", 400),
    case("empty-body", CHAT, b"", 400),
    case("deeply-nested-json", CHAT, b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400),
    # Messages.
    case("missing-messages", CHAT, without(chat(), "messages"), 400, "messages"),
    case("messages-not-a-list", CHAT, chat(messages="hi"), 400, "messages"),
    case("empty-messages", CHAT, chat(messages=[]), 400, "messages"),
    case("message-not-an-object", CHAT, chat(messages=["hi"]), 400, "messages[0]"),
    case("missing-role", CHAT, chat(messages=[{"content": "hi"}]), 400, "messages[0].role"),
    case("unknown-role", CHAT, chat(messages=[{"role": "elf", "content": "hi"}]), 400, "messages"),
    case("content-a-number", CHAT, chat(messages=NUMBER_CONTENT), 400, "messages[0].content"),
    case("image-content-part", CHAT, chat(messages=IMAGE_CONTENT), 400, "messages"),
    # Wrong types: strings are not coerced to numbers.
    case("max-tokens-a-string", CHAT, chat(max_tokens="10"), 400, "max_tokens"),
    case("temperature-a-string", CHAT, chat(temperature="hot"), 400, "temperature"),
    case("n-a-bool", CHAT, chat(n=True), 400, "n"),
    case("stream-a-string", CMPL, cmpl(stream="yes"), 400, "stream"),
    # Out of range.
    case("temperature-negative", CHAT, chat(temperature=-1), 400, "temperature"),
    case("temperature-nan", CHAT, chat()[:-1] + b', "temperature": NaN}', 400, "temperature"),
    case("top-p-2", CHAT, chat(top_p=2), 400, "top_p"),
    case("n-0", CHAT, chat(n=0), 400, "n"),
    case("n-17", CHAT, chat(n=17), 400, "n"),
    case("max-tokens-0", CHAT, chat(max_tokens=0), 400, "max_tokens"),
    case("top-logprobs-50", CHAT, chat(logprobs=True, top_logprobs=50), 400, "top_logprobs"),
    case("top-logprobs-without-logprobs", CHAT, chat(top_logprobs=5), 400, "top_logprobs"),
    case("presence-penalty-5", CHAT, chat(presence_penalty=5), 400, "presence_penalty"),
    case("frequency-penalty-minus-3", CMPL, cmpl(frequency_penalty=-3), 400, "frequency_penalty"),
    case("seed-2**64", CHAT, chat(seed=2**64), 400, "seed"),
    case("top-k-2**64", CHAT, chat(top_k=2**64), 400, "top_k"),
    case("stop-token-id-2**64", CHAT, chat(stop_token_ids=[2**64]), 400, "stop_token_ids"),
    case("empty-stop-string", CHAT, chat(stop=[""]), 400, "stop"),
    case("stream-options-without-stream", CHAT, chat(stream_options=USAGE), 400, "stream_options"),
    case("completion-logprobs-50", CMPL, cmpl(logprobs=50), 400, "logprobs"),
    # Unknown model.
    case("unknown-model", CHAT, chat(model="gpt-4o"), 404, "model", "model_not_found"),
    case("unknown-model-cmpl", CMPL, cmpl(model="gpt-4o"), 404, "model", "model_not_found"),
    # Longer than --max-model-len.
    case("chat-max-tokens-over-context", CHAT, chat(max_tokens=1000), 400, "max_tokens"),
    case("chat-prompt-over-context", CHAT, chat(messages=LONG_CONTENT), 400, "messages"),
    case("completion-max-tokens-over-context", CMPL, cmpl(max_tokens=1000), 400, "max_tokens"),
    case("completion-prompt-over-context", CMPL, cmpl(prompt="x" * MAX_MODEL_LEN), 400, "prompt"),
    # Completions prompts.
    case("missing-prompt", CMPL, without(cmpl(), "prompt"), 400, "prompt"),
    case("empty-prompt", CMPL, cmpl(prompt=""), 400, "prompt"),
    case("token-id-outside-vocab", CMPL, cmpl(prompt=[1, 10**9]), 400, "prompt"),
    # Known features pdserve does not implement: refused, never ignored.
    case("tools", CHAT, chat(tools=TOOLS), 400, "tools", "unsupported"),
    case("logit-bias", CHAT, chat(logit_bias={"5": 1}), 400, "logit_bias", "unsupported"),
    case("suffix", CMPL, cmpl(suffix="!"), 400, "suffix", "unsupported"),
    # HTTP level.
    case("body-over-limit", CHAT, chat(user="x" * MAX_BODY), 413, None, "request_too_large"),
    case("get-on-post-route", CHAT, None, 405, method="GET"),
    case("unknown-route", "/v1/embeddings", chat(), 404),
]


@pytest.fixture(scope="module")
def guarded() -> Iterator[Node]:
    """A node with small limits and an API key; every request of the table sends the key."""
    node = start_node("--max-model-len", str(MAX_MODEL_LEN),
                      "--max-request-body-bytes", str(MAX_BODY), api_key=KEY)  # fmt: skip
    yield node
    assert node.stop() == 0
    node.remove_log()


def error_of(text: str) -> dict[str, Any]:
    """The `error` object of an OpenAI-style error body, checked for its four fields."""
    body = json.loads(text)
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    return error


@pytest.mark.parametrize(("method", "path", "body", "status", "param", "code"), CASES)
def test_bad_input_gets_openai_error(
    guarded: Node,
    method: str,
    path: str,
    body: bytes | None,
    status: int,
    param: str | None,
    code: str | None,
) -> None:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    got, text = http(method, guarded.url + path, body, headers)
    assert got == status, text
    error = error_of(text)
    assert error["type"] == "invalid_request_error", error
    assert error["param"] == param, error
    assert error["code"] == code, error


@pytest.mark.parametrize(
    "authorization", [None, "Bearer wrong-key", KEY], ids=["missing", "wrong", "no-bearer"]
)
def test_api_key_is_required(guarded: Node, authorization: str | None) -> None:
    headers = {"Content-Type": "application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization
    for path in (CHAT, CMPL, "/v1/models"):
        method, body = ("GET", None) if path == "/v1/models" else ("POST", b"{}")
        status, text = http(method, guarded.url + path, body, headers)
        assert status == 401, (path, text)
        assert error_of(text)["code"] == "invalid_api_key"
    assert http("GET", guarded.url + "/health") == (200, "ok")  # probes need no key


def test_openai_client_with_wrong_key_gets_authentication_error(guarded: Node) -> None:
    client = openai.OpenAI(base_url=guarded.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as exc:
        client.chat.completions.create(model="tiny", messages=USER, max_tokens=4)
    assert exc.value.status_code == 401


def test_node_still_serves_after_bad_inputs(guarded: Node) -> None:
    """Runs after the table (pytest keeps file order): nothing above broke or leaked."""
    reply = guarded.client().chat.completions.create(model="tiny", messages=USER, max_tokens=8)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.completion_tokens >= 1
    guarded.wait_blocks_free()


# --- Start-up refusals ------------------------------------------------------------------------


def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `pdserve serve` on free ports (later flags win) until it exits."""
    port, metrics_port, eq, cq, pd = free_ports(5)
    cmd = [sys.executable, "-m", "pdserve.cli", "serve", "--model", "tiny",
           "--port", str(port), "--metrics-port", str(metrics_port),
           "--engine-worker-queue-port", str(eq), "--cache-queue-port", str(cq),
           "--pd-comm-port", str(pd), *args]  # fmt: skip
    return subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=20)  # fmt: skip


@pytest.mark.parametrize("flag", ["--port", "--metrics-port", "--engine-worker-queue-port"])
def test_port_in_use_exits_naming_the_flag(flag: str) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        begin = time.monotonic()
        result = serve(flag, str(port))
        elapsed = time.monotonic() - begin
    assert result.returncode != 0
    assert f"{flag} {port}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert elapsed < 10


def bad(*args: str, env: dict[str, str] | None = None, named: str) -> Any:
    return pytest.param(list(args), env, named, id=" ".join(args) or f"env {env}")


@pytest.mark.parametrize(("args", "env", "named"), [
    bad("--max-num-seqs", "0", named="--max-num-seqs"),
    bad("--max-num-seqs", "many", named="--max-num-seqs"),
    bad("--innode-prefill-ports", "8002", named="--innode-prefill-ports"),  # mixed node
    bad("--cache-transfer-protocol", "rdma", named="--cache-transfer-protocol"),
    bad("--splitwise-role", "router", named="--splitwise-role"),
    bad("--tensor-parallel-size", "3", named="--tensor-parallel-size"),  # 4 heads do not split
    bad("--tensor-parallel-size", "0", named="--tensor-parallel-size"),
    bad("--swap-space", "-1", named="--swap-space"),
    bad("--kv-cache-ratio", "0", named="--kv-cache-ratio"),
    bad("--max-model-len", "200000", named="--max-model-len"),  # the tiny model has 131072
    bad(env={"FD_ATTENTION_BACKEND": "BOGUS"}, named="FD_ATTENTION_BACKEND"),
])  # fmt: skip
def test_bad_flag_exits_2_naming_it(args: list[str], env: dict[str, str] | None,
                                    named: str) -> None:  # fmt: skip
    result = serve(*args, env=env)
    assert result.returncode == 2, result.stderr
    assert named in result.stderr
    assert "Traceback" not in result.stderr, result.stderr
