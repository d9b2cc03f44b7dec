"""Request bodies of the OpenAI Chat Completions and Completions APIs, validated with pydantic.

Known fields are checked strictly (a string where a number belongs is an error, not coerced);
unknown fields are ignored, since OpenAI clients add new ones over time. Null means "default"
for every optional field. Ranges that `SamplingParams` already checks are left to it, so each
rule lives in one place; `params.py` maps a request to `SamplingParams`.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, PlainValidator

MAX_N = 16  # choices per request
MAX_STOP = 16  # stop strings per request
MAX_TOP_LOGPROBS = 20


def _stop(value: Any) -> str | list[str] | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        if len(value) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings are allowed, got {len(value)}")
        return value
    raise ValueError("must be a string or a list of strings")


def _content(value: Any) -> str | list[dict[str, Any]] | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        return value
    raise ValueError("must be a string, null, or a list of content parts")


def _prompt(value: Any) -> str | list[str] | list[int] | list[list[int]]:
    def is_ids(v: Any) -> bool:
        return isinstance(v, list) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in v
        )

    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        if all(isinstance(p, str) for p in value) or is_ids(value):
            return value
        if all(is_ids(p) for p in value):
            return value
    raise ValueError(
        "must be a string, a list of strings, a list of token ids, or a list of token id lists"
    )


Stop = Annotated[str | list[str] | None, PlainValidator(_stop)]
Content = Annotated[str | list[dict[str, Any]] | None, PlainValidator(_content)]
Prompt = Annotated[str | list[str] | list[int] | list[list[int]], PlainValidator(_prompt)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    """`stream_options`: whether the stream ends with a usage chunk."""

    include_usage: bool | None = None


class ChatMessage(BaseModel):
    """One message of a conversation; fields besides role and content reach the template."""

    model_config = ConfigDict(strict=True, extra="allow")

    role: str
    content: Content = None
    name: str | None = None


class _SamplingFields(_Strict):
    """Fields both endpoints share: the model, streaming, and how tokens are sampled."""

    model: str | None = None
    n: Annotated[int | None, Field(ge=1, le=MAX_N)] = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    stop: Stop = None
    stop_token_ids: list[int] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    include_stop_str_in_output: bool | None = None
    return_token_ids: bool | None = None
    skip_special_tokens: bool | None = None
    user: str | None = None
    # Known OpenAI fields pdserve does not implement: accepted only at their neutral values.
    logit_bias: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None

    @property
    def num_choices(self) -> int:
        return 1 if self.n is None else self.n

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int | None, Field(ge=0, le=MAX_TOP_LOGPROBS)] = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None

    @property
    def max_tokens_field(self) -> str:
        """The field the output length came from; max_completion_tokens wins over max_tokens."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    @property
    def requested_max_tokens(self) -> int | None:
        return getattr(self, self.max_tokens_field)

    @property
    def num_logprobs(self) -> int | None:
        """Top alternatives per token for SamplingParams.logprobs (None: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: Prompt
    logprobs: Annotated[int | None, Field(ge=0, le=MAX_TOP_LOGPROBS)] = None
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None

    @property
    def max_tokens_field(self) -> str:
        return "max_tokens"

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs
