"""Response bodies of the Chat Completions, Completions and Models APIs, as OpenAI returns them.

Fields that OpenAI always sends stay in the JSON when null (`finish_reason`, `logprobs`);
optional ones listed in a model's `omit_if_none` (delta fields, a chunk's usage, and the
FastDeploy `prompt_token_ids` / `completion_token_ids` extension) are left out when unset.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
)


class _Out(BaseModel):
    omit_if_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        for name in self.omit_if_none:
            if data.get(name, 0) is None:
                del data[name]
        return data


def _now() -> int:
    return int(time.time())


class PromptTokensDetails(_Out):
    cached_tokens: int = 0  # prompt tokens served from the prefix cache


class Usage(_Out):
    """Token counts: the prompt once per prompt, the completion summed over choices."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobEntry(_Out):
    """One generated token in `choices[].logprobs.content`."""

    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(_Out):
    content: list[ChatLogprobEntry] | None = None
    refusal: list[ChatLogprobEntry] | None = None


class ChatMessageOut(_Out):
    omit_if_none = frozenset({"prompt_token_ids", "completion_token_ids"})

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    prompt_token_ids: list[int] | None = None
    completion_token_ids: list[int] | None = None


class ChatChoice(_Out):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(_Out):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(_Out):
    omit_if_none = frozenset({"role", "content", "prompt_token_ids", "completion_token_ids"})

    role: Literal["assistant"] | None = None
    content: str | None = None
    prompt_token_ids: list[int] | None = None
    completion_token_ids: list[int] | None = None


class ChatChunkChoice(_Out):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Out):
    omit_if_none = frozenset({"usage"})

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(_Out):
    """Legacy completions logprobs: parallel lists, top alternatives as {token: logprob}."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_Out):
    omit_if_none = frozenset({"prompt_token_ids", "completion_token_ids"})

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    prompt_token_ids: list[int] | None = None
    completion_token_ids: list[int] | None = None


class CompletionResponse(_Out):
    """A completions response, and also each chunk of a completions stream (no usage there)."""

    omit_if_none = frozenset({"usage"})

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(_Out):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "pdserve"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(_Out):
    object: Literal["list"] = "list"
    data: list[ModelCard]
