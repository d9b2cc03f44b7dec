"""The engine boundary the OpenAI layer is written against: a stream of token deltas per request.

The frontend's engine client (ZeroMQ to the engine process), a router's gRPC client and the
tests' scripted fakes all implement `EngineClient`; nothing here knows which one it talks to.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from pdserve.engine.sampling_params import SamplingParams


@dataclass
class TokenDelta:
    """What one engine step added to one request.

    Attributes:
        token_ids: Tokens appended this step (usually one; more with speculative decoding).
        logprobs: Logprob of each token under the raw model distribution.
        top_logprobs: Per token, the (token id, logprob) alternatives sorted by logprob
            descending, or None when the request asked for none.
        finish_reason: "stop", "length" or "abort" on the request's last delta, else None.
        num_prompt_tokens: Tokens in the prompt.
        num_cached_tokens: Prompt tokens served from the prefix cache (not recomputed).
    """

    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]] | None
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int


class EngineError(Exception):
    """The engine could not serve a request."""


class RequestRejected(EngineError, ValueError):
    """The engine refused the request; the message is fit to show the client (HTTP 400)."""


class EngineDeadError(EngineError):
    """The engine process is gone or unreachable (HTTP 503)."""


class RequestAborted(EngineDeadError):
    """Someone aborted the request at the node (the gRPC Abort call) while it ran (HTTP 503)."""


class PrefillFailed(EngineDeadError):
    """A decode node's remote prefill failed and --pd-fallback is fail (HTTP 503); the decode
    node itself is fine."""


@runtime_checkable
class EngineClient(Protocol):
    """Submits requests to an engine and streams their tokens back."""

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[TokenDelta]:
        """Stream the request's deltas; the last one carries a finish_reason.

        Iterating raises `RequestRejected` or `EngineDeadError`. Closing the iterator early
        (`aclose()`, or cancelling the task awaiting it) aborts the request in the engine.
        """
        ...

    async def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks; a no-op for unknown or finished requests."""
        ...

    @property
    def num_running(self) -> int:
        """Requests in flight in the engine (admitted and not finished)."""
        ...
