"""Server-sent events: the `data: ...` lines of a streaming response."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator

from pydantic import BaseModel

from pdserve.openai.errors import OpenAIError
from pdserve.openai.fanout import Fanout

DONE = "data: [DONE]\n\n"


def sse_event(payload: BaseModel) -> str:
    """One SSE event carrying a response model as JSON."""
    return f"data: {payload.model_dump_json()}\n\n"


def sse_error(error: OpenAIError) -> str:
    """The event that ends a stream which failed after it started (then comes DONE)."""
    body = json.dumps(error.error_body(), ensure_ascii=False, separators=(",", ":"))
    return f"data: {body}\n\n"


class SSEStream:
    """The SSE lines of a streaming response, ending with `data: [DONE]`.

    The engine requests behind it are already running. Iterating to the end releases them;
    a caller that stops early (client gone, write failed) must `await aclose()`, which aborts
    whatever is still generating. Cancelling the task iterating it does the same.
    """

    def __init__(self, lines: AsyncGenerator[str, None], fanout: Fanout) -> None:
        self._lines = lines
        self._fanout = fanout

    def __aiter__(self) -> SSEStream:
        return self

    async def __anext__(self) -> str:
        return await self._lines.__anext__()

    async def aclose(self) -> None:
        """Stop the stream and abort its engine requests; safe to call more than once."""
        try:
            await self._lines.aclose()
        finally:
            await self._fanout.aclose()
