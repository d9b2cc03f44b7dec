"""A scripted `EngineClient` at the process boundary, and helpers for the OpenAI layer's tests."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pdserve.engine.sampling_params import SamplingParams
from pdserve.openai.engine_protocol import EngineDeadError, RequestRejected, TokenDelta
from pdserve.openai.errors import OpenAIError
from pdserve.openai.serving import OpenAIServing
from pdserve.openai.sse import SSEStream
from pdserve.tokenizer import BYTE_OFFSET, ByteTokenizer

EOS = 2  # the byte tokenizer's </s>
ALT = BYTE_OFFSET + ord("?")  # the scripted runner-up token

Script = Callable[[str, list[int], SamplingParams], list[int]]


def ids(text: str) -> list[int]:
    """Byte tokenizer ids of text: byte b is id 8 + b."""
    return [BYTE_OFFSET + b for b in text.encode()]


def logprob_of(position: int) -> float:
    """The scripted logprob of the output token at `position`."""
    return -0.5 * (position + 1)


@dataclass
class ScriptedEngine:
    """Answers each request with the tokens `script` picks, one per step, like the engine core.

    Finishes with "stop" on EOS or a stop token (after min_tokens, unless ignore_eos), with
    "length" at max_tokens or when the script runs out. Records what it was asked and which
    requests were closed before they finished (aborted).
    """

    script: Script = lambda rid, prompt, params: ids("Hello") + [EOS]  # noqa: E731
    num_cached_tokens: int = 0
    reject: str | None = None  # RequestRejected message raised on the first read
    die_after: int | None = None  # EngineDeadError after this many tokens
    step_delay: float = 0.0
    requests: dict[str, tuple[list[int], SamplingParams]] = field(default_factory=dict)
    aborted: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    running: set[str] = field(default_factory=set)
    extra_running: int = 0  # requests of other frontends, counted in num_running

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[TokenDelta]:
        return self._run(request_id, list(prompt_token_ids), params)

    async def _run(
        self, rid: str, prompt: list[int], params: SamplingParams
    ) -> AsyncIterator[TokenDelta]:
        if self.reject is not None:
            raise RequestRejected(self.reject)
        self.requests[rid] = (prompt, params)
        self.running.add(rid)
        done = False
        try:
            tokens = self.script(rid, prompt, params)
            for k, token in enumerate(tokens):
                await asyncio.sleep(self.step_delay)
                if self.die_after is not None and k >= self.die_after:
                    raise EngineDeadError("engine process died")
                n = k + 1
                stops = token in params.stop_token_ids or (token == EOS and not params.ignore_eos)
                finish = None
                if n >= params.min_tokens and stops:
                    finish = "stop"
                elif n >= params.max_tokens or n == len(tokens):
                    finish = "length"
                top = None
                if params.logprobs:  # the sampled token, then "?" at -20
                    top = [[(token, logprob_of(k)), (ALT, -20.0)][: params.logprobs]]
                yield TokenDelta(
                    [token], [logprob_of(k)], top, finish, len(prompt), self.num_cached_tokens
                )
                if finish is not None:
                    done = True
                    self.finished.append(rid)
                    return
        finally:
            self.running.discard(rid)
            if not done:
                self.aborted.append(rid)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    @property
    def num_running(self) -> int:
        return len(self.running) + self.extra_running


MODEL = "tiny"
MAX_MODEL_LEN = 256
T = TypeVar("T")


def make_serving(
    engine: ScriptedEngine | None = None,
    max_model_len: int = MAX_MODEL_LEN,
    max_concurrency: int | None = None,
) -> OpenAIServing:
    """Handlers over a scripted engine and the byte tokenizer, serving model "tiny"."""
    return OpenAIServing(
        engine or ScriptedEngine(), ByteTokenizer(), MODEL, max_model_len, max_concurrency
    )


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def raises_openai(coro: Coroutine[Any, Any, Any]) -> OpenAIError:
    """Run a handler call and return the OpenAIError it raised (fails if none)."""

    async def call() -> OpenAIError:
        try:
            await coro
        except OpenAIError as e:
            return e
        raise AssertionError("no OpenAIError was raised")

    return asyncio.run(call())


async def read_sse(stream: AsyncIterator[str]) -> list[Any]:
    """Every event of a stream as JSON, [DONE] as the string "[DONE]"."""
    events = []
    async for line in stream:
        assert line.startswith("data: ") and line.endswith("\n\n"), line
        data = line[len("data: ") : -2]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def chat_body(**fields: Any) -> dict:
    """A chat request body for "tiny" saying "hi", plus `fields`."""
    return {"model": MODEL, "messages": user("hi"), **fields}


async def stream_events(serving: OpenAIServing, body: dict, endpoint: str = "chat") -> list:
    """Call a streaming endpoint and read all its events."""
    stream = await getattr(serving, endpoint)(body)
    assert isinstance(stream, SSEStream)
    return await read_sse(stream)


def contents(events: list, index: int = 0) -> list[str | None]:
    """The delta content of each chat chunk of one choice (None where a delta has none)."""
    return [
        c["delta"].get("content")
        for e in events[:-1]
        for c in e.get("choices", [])
        if c["index"] == index
    ]
