"""The node's HTTP front: OpenAI routes, /health, /metrics, API key, body limits, SSE."""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import ClientConnectionResetError, web

from pdserve.metrics import NodeMetrics
from pdserve.openai.errors import OpenAIError, service_unavailable, unauthorized
from pdserve.openai.serving import OpenAIServing

logger = logging.getLogger("pdserve.node")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_PUBLIC = ("/health", "/metrics")  # answered without the API key, like vLLM


def error_response(status: int, message: str, type_: str, param: str | None = None,
                   code: str | None = None) -> web.Response:  # fmt: skip
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return web.json_response(body, status=status)


class NodeState:
    """What the HTTP front needs to know about the node's life."""

    def __init__(self) -> None:
        self.healthy = True
        self.draining = False
        self.reason = ""


def build_app(
    serving: OpenAIServing,
    metrics: NodeMetrics,
    state: NodeState,
    api_key: str | None,
    max_body_bytes: int,
) -> web.Application:
    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if api_key is not None and request.path not in _PUBLIC:
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                err = unauthorized()
                return web.json_response(err.error_body(), status=err.status)
        try:
            return await handler(request)
        except OpenAIError as e:
            return web.json_response(e.error_body(), status=e.status)
        except web.HTTPRequestEntityTooLarge:
            return error_response(413, f"request body exceeds {max_body_bytes} bytes",
                                  "invalid_request_error", code="request_too_large")  # fmt: skip
        except web.HTTPException as e:
            if e.status == 404 or e.status == 405:
                return error_response(e.status, f"{request.method} {request.path}: {e.reason}",
                                      "invalid_request_error")  # fmt: skip
            raise

    async def read_json(request: web.Request) -> dict:
        if state.draining or not state.healthy:
            raise service_unavailable(f"the node is not serving: {state.reason}")
        raw = await request.read()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise OpenAIError(400, f"invalid JSON body: {e}", "invalid_request_error") from None
        except RecursionError:
            raise OpenAIError(400, "invalid JSON body: nested too deeply",
                              "invalid_request_error") from None  # fmt: skip
        if not isinstance(body, dict):
            raise OpenAIError(400, "the JSON body must be an object", "invalid_request_error")
        return body

    async def respond(
        request: web.Request, result: dict | AsyncIterator[str]
    ) -> web.StreamResponse:
        if isinstance(result, dict):
            return web.json_response(result)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})  # fmt: skip
        try:
            await resp.prepare(request)
            async for line in result:
                await resp.write(line.encode())
            await resp.write_eof()
        except (ConnectionError, ClientConnectionResetError):
            logger.info("client of %s went away mid-stream; request aborted", request.path)
        finally:
            await result.aclose()  # closes the engine streams when the client went away
        return resp

    async def chat(request: web.Request) -> web.StreamResponse:
        return await respond(request, await serving.chat(await read_json(request)))

    async def completions(request: web.Request) -> web.StreamResponse:
        return await respond(request, await serving.completions(await read_json(request)))

    async def models(request: web.Request) -> web.Response:
        return web.json_response(serving.list_models())

    async def health(request: web.Request) -> web.Response:
        if state.healthy and not state.draining:
            return web.Response(text="ok")
        return web.Response(status=503, text=state.reason or "unhealthy")

    app = web.Application(middlewares=[guard], client_max_size=max_body_bytes)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics_handler(metrics))
    return app


def metrics_handler(metrics: NodeMetrics) -> Handler:
    async def handle(request: web.Request) -> web.Response:
        resp = web.Response(body=metrics.render())
        resp.content_type = "text/plain"
        resp.charset = "utf-8"
        return resp

    return handle


def build_metrics_app(metrics: NodeMetrics) -> web.Application:
    app = web.Application()
    app.router.add_get("/metrics", metrics_handler(metrics))
    return app
