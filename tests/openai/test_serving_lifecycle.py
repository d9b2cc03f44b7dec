"""OpenAIServing when requests end early: closed streams, cancelled handlers, engine errors."""

from __future__ import annotations

import asyncio

import pytest

from pdserve.openai.errors import OpenAIError
from tests.openai.fake_engine import (
    ScriptedEngine,
    chat_body,
    contents,
    ids,
    make_serving,
    raises_openai,
    run,
    stream_events,
)

FOREVER = lambda rid, prompt, params: ids("x") * 10_000  # noqa: E731


def test_closing_a_stream_early_aborts_every_choice() -> None:
    engine = ScriptedEngine(script=FOREVER, step_delay=0.001)
    serving = make_serving(engine)

    async def go() -> list[str]:
        stream = await serving.chat(chat_body(stream=True, n=2))
        lines = [await stream.__anext__() for _ in range(4)]
        await stream.aclose()
        await stream.aclose()  # idempotent
        return lines

    lines = run(go())
    assert len(lines) == 4 and "[DONE]" not in lines[-1]
    assert sorted(engine.aborted) == sorted(engine.requests) and len(engine.aborted) == 2
    assert not engine.running and serving._num_active == 0


def test_cancelling_the_reader_aborts_every_choice() -> None:
    engine = ScriptedEngine(script=FOREVER, step_delay=0.001)
    serving = make_serving(engine)

    async def go() -> int:
        stream = await serving.chat(chat_body(stream=True, n=2))
        got = []

        async def consume() -> None:
            async for line in stream:
                got.append(line)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return len(got)

    assert run(go()) > 2
    assert len(engine.aborted) == 2 and not engine.running and serving._num_active == 0


def test_cancelling_a_non_streamed_request_aborts_it() -> None:
    engine = ScriptedEngine(script=FOREVER, step_delay=0.001)
    serving = make_serving(engine)

    async def go() -> None:
        task = asyncio.create_task(serving.completions({"prompt": "ab", "n": 3}))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(go())
    assert len(engine.aborted) == 3 and not engine.running and serving._num_active == 0


def test_engine_rejection_is_a_400_even_when_streaming() -> None:
    engine = ScriptedEngine(reject="prompt does not fit in the KV cache")
    for stream in (False, True):
        err = raises_openai(make_serving(engine).chat(chat_body(stream=stream, n=2)))
        assert (err.status, err.type) == (400, "invalid_request_error")
        assert err.message == "prompt does not fit in the KV cache"


def test_engine_death() -> None:
    engine = ScriptedEngine(die_after=2)
    err = raises_openai(make_serving(engine).chat(chat_body()))
    assert (err.status, err.type) == (503, "server_error")
    events = run(stream_events(make_serving(engine), chat_body(stream=True)))
    assert contents(events[:-1]) == ["", "H", "e"]
    assert events[-2] == {
        "error": {
            "message": "engine process died",
            "type": "server_error",
            "param": None,
            "code": "service_unavailable",
        }
    }
    assert events[-1] == "[DONE]"
    err = raises_openai(make_serving(ScriptedEngine(die_after=0)).chat(chat_body(stream=True)))
    assert err.status == 503  # before the first token: still an HTTP error


class EndsEarly(ScriptedEngine):
    """Its streams end after one token without a finish reason (a broken engine client)."""

    async def _run(self, rid, prompt, params):  # type: ignore[override]
        async for delta in super()._run(rid, prompt, params):
            delta.finish_reason = None
            yield delta
            return


def test_stream_ending_without_finish_is_a_503() -> None:
    err = raises_openai(make_serving(EndsEarly()).chat(chat_body()))
    assert err.status == 503 and "unfinished" in err.message


def test_concurrency_limit() -> None:
    engine = ScriptedEngine(extra_running=2)
    err = raises_openai(make_serving(engine, max_concurrency=3).chat(chat_body(n=2)))
    assert (err.status, err.type, err.code) == (429, "rate_limit_error", "rate_limit_exceeded")
    err = raises_openai(make_serving(engine, max_concurrency=3).chat(chat_body(n=4)))
    assert (err.status, err.param) == (400, "n")
    assert run(make_serving(engine, max_concurrency=4).chat(chat_body(n=2)))["choices"]


class LaggingCount(ScriptedEngine):
    """An engine whose num_running has not yet seen this frontend's requests."""

    @property
    def num_running(self) -> int:
        return 0


def test_concurrency_counts_requests_the_engine_has_not_reported() -> None:
    engine = LaggingCount(script=FOREVER, step_delay=0.001)
    serving = make_serving(engine, max_concurrency=2)

    async def go() -> None:
        stream = await serving.chat(chat_body(stream=True, n=2))
        with pytest.raises(OpenAIError) as e:
            await serving.chat(chat_body())
        assert e.value.status == 429
        await stream.aclose()
        assert (await serving.chat(chat_body(max_tokens=1)))["choices"]

    run(go())
    assert serving._num_active == 0
