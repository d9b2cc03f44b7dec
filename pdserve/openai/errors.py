"""OpenAI-style errors: an exception carrying the HTTP status and the `{"error": ...}` body."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError


class OpenAIError(Exception):
    """An error the HTTP layer returns as `status` with `error_body()` as its JSON body.

    Attributes:
        status: HTTP status code.
        message: Human-readable text, shown to the client.
        type: OpenAI's error type, e.g. "invalid_request_error".
        param: The request field at fault (a dotted path such as "messages[0].content"), or None.
        code: A machine-readable code such as "model_not_found", or None.
    """

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def error_body(self) -> dict[str, Any]:
        """The JSON body: `{"error": {"message", "type", "param", "code"}}`."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def __repr__(self) -> str:
        return f"OpenAIError({self.status}, {self.message!r}, param={self.param!r})"


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    """400: the request is malformed or asks for something this server cannot do."""
    return OpenAIError(400, message, "invalid_request_error", param, code)


def not_supported(param: str, what: str | None = None) -> OpenAIError:
    """400 for a field that pdserve knows but does not implement (never silently ignored)."""
    return bad_request(f"{what or param} is not supported by this server", param, "unsupported")


def unauthorized(message: str = "Incorrect API key provided.") -> OpenAIError:
    """401: missing or wrong bearer token."""
    return OpenAIError(401, message, "invalid_request_error", None, "invalid_api_key")


def model_not_found(model: str) -> OpenAIError:
    """404: the request names a model this server does not serve."""
    return OpenAIError(
        404,
        f"The model `{model}` does not exist.",
        "invalid_request_error",
        "model",
        "model_not_found",
    )


def payload_too_large(message: str) -> OpenAIError:
    """413: the request body is over the server's size limit."""
    return OpenAIError(413, message, "invalid_request_error", None, "request_too_large")


def too_many_requests(message: str) -> OpenAIError:
    """429: the server is at its concurrency limit; the client may retry later."""
    return OpenAIError(429, message, "rate_limit_error", None, "rate_limit_exceeded")


def service_unavailable(message: str) -> OpenAIError:
    """503: the engine is down, draining, or aborted the request."""
    return OpenAIError(503, message, "server_error", None, "service_unavailable")


def internal_error(message: str = "internal server error") -> OpenAIError:
    """500: a bug in the server; the details go to the log, not the client."""
    return OpenAIError(500, message, "server_error", None, "internal_error")


def loc_to_param(loc: tuple[str | int, ...]) -> str | None:
    """A pydantic error location as a field path: ("messages", 0, "role") -> "messages[0].role"."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or None


def from_validation_error(exc: ValidationError) -> OpenAIError:
    """A 400 naming the first invalid field of a request body."""
    err = exc.errors(include_url=False)[0]
    param = loc_to_param(tuple(err["loc"]))
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        return bad_request(f"'{param}' is a required property", param)
    if param is None:
        return bad_request(f"Invalid request body: {msg}")
    return bad_request(f"Invalid value for '{param}': {msg}", param)
