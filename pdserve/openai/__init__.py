"""The OpenAI-compatible API: request and response schemas, validation, and serving logic.

`OpenAIServing` holds the handlers; an HTTP server mounts them and writes out what they
return. Everything below the `EngineClient` protocol (engine_protocol.py) is someone else's.
"""

from __future__ import annotations

from pdserve.openai.engine_protocol import (
    EngineClient,
    EngineDeadError,
    EngineError,
    RequestRejected,
    TokenDelta,
)
from pdserve.openai.errors import OpenAIError
from pdserve.openai.serving import OpenAIServing
from pdserve.openai.sse import SSEStream

__all__ = [
    "EngineClient",
    "EngineDeadError",
    "EngineError",
    "OpenAIError",
    "OpenAIServing",
    "RequestRejected",
    "SSEStream",
    "TokenDelta",
]
