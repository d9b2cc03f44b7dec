"""The official openai client against the handlers, mounted on a minimal aiohttp app.

The real server (pdserve/node) is tested elsewhere; this app only writes out what the handlers
return, so the client checks the wire format: JSON bodies, SSE chunks and error bodies.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import openai
import pytest
from aiohttp import web

from pdserve.openai.errors import OpenAIError
from pdserve.openai.serving import OpenAIServing
from tests.openai.fake_engine import ScriptedEngine, make_serving, run, user

Handler = Callable[[Any], Awaitable[Any]]


def _route(handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            result = await handler(await request.json())
        except OpenAIError as e:
            return web.json_response(e.error_body(), status=e.status)
        if isinstance(result, dict):
            return web.json_response(result)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        try:
            await response.prepare(request)
            async for line in result:
                await response.write(line.encode())
        finally:
            await result.aclose()
        return response

    return handle


@asynccontextmanager
async def client_for(serving: OpenAIServing) -> AsyncIterator[openai.AsyncOpenAI]:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", _route(serving.chat))
    app.router.add_post("/v1/completions", _route(serving.completions))

    async def models(_: web.Request) -> web.Response:
        return web.json_response(serving.list_models())

    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
    try:
        yield client
    finally:
        await client.close()
        await runner.cleanup()


def test_official_client_round_trip() -> None:
    engine = ScriptedEngine(num_cached_tokens=3)

    async def go() -> None:
        async with client_for(make_serving(engine)) as client:
            models = await client.models.list()
            assert [m.id for m in models.data] == ["tiny"]

            chat = await client.chat.completions.create(
                model="tiny", messages=user("hi"), logprobs=True, top_logprobs=1
            )
            assert chat.choices[0].message.content == "Hello"
            assert chat.choices[0].logprobs.content[0].token == "H"
            assert chat.usage.prompt_tokens_details.cached_tokens == 3

            stream = await client.chat.completions.create(
                model="tiny", messages=user("hi"), stream=True, n=2,
                stream_options={"include_usage": True}, stop=["lo"],
            )  # fmt: skip
            texts, usage = ["", ""], None
            async for chunk in stream:
                for c in chunk.choices:
                    texts[c.index] += c.delta.content or ""
                usage = chunk.usage or usage
            assert texts == ["Hel", "Hel"] and usage.completion_tokens == 10

            done = await client.completions.create(model="tiny", prompt="ab", max_tokens=2)
            assert done.choices[0].text == "He" and done.choices[0].finish_reason == "length"
            chunks = await client.completions.create(
                model="tiny", prompt="ab", stream=True, extra_body={"return_token_ids": True}
            )
            assert "".join([c.choices[0].text async for c in chunks]) == "Hello"

            with pytest.raises(openai.BadRequestError) as e:
                await client.chat.completions.create(
                    model="tiny", messages=user("hi"), temperature=-1
                )
            assert e.value.body["param"] == "temperature"
            with pytest.raises(openai.NotFoundError) as e:
                await client.chat.completions.create(model="gpt-4o", messages=user("hi"))
            assert e.value.body["code"] == "model_not_found"

    run(go())
    assert len(engine.aborted) == 2  # the two choices cut by the stop string
