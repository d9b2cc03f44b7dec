"""Choice states and updates rendered as chat or completions responses and stream chunks."""

from __future__ import annotations

import time
from collections.abc import Sequence

from pdserve.openai.choice import ChoiceState, ChoiceUpdate
from pdserve.openai.inputs import Prompt
from pdserve.openai.logprobs import LogprobFormatter
from pdserve.openai.protocol import ChatCompletionRequest, CompletionRequest
from pdserve.openai.responses import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessageOut,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    DeltaMessage,
    PromptTokensDetails,
    Usage,
)


def usage(prompts: Sequence[Prompt], states: Sequence[ChoiceState]) -> Usage:
    """Each prompt's tokens counted once however many choices continue it; cached tokens are
    the fewest any of its choices got from the prefix cache."""
    prompt_tokens = sum(len(p.token_ids) for p in prompts)
    completion_tokens = sum(len(s.token_ids) for s in states)
    cached = sum(
        min((s.num_cached_tokens for s in states if s.prompt_index == k), default=0)
        for k in range(len(prompts))
    )
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


class ChatRenderer:
    """Chat Completions output: `chat.completion`, or `chat.completion.chunk` events."""

    def __init__(
        self,
        response_id: str,
        model: str,
        req: ChatCompletionRequest,
        prompts: Sequence[Prompt],
        formatter: LogprobFormatter,
    ) -> None:
        self.id, self.model, self.created = response_id, model, int(time.time())
        self._logprobs = bool(req.logprobs)
        self._num_top = req.top_logprobs or 0
        self._token_ids = bool(req.return_token_ids)
        self._prompts = prompts
        self._fmt = formatter

    def _prompt_ids(self, state: ChoiceState) -> list[int] | None:
        return self._prompts[state.prompt_index].token_ids if self._token_ids else None

    def _chunk(
        self, choices: list[ChatChunkChoice], use: Usage | None = None
    ) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=use
        )

    def head(self, states: Sequence[ChoiceState]) -> list[ChatCompletionChunk]:
        """The first chunk of each choice: the assistant role and empty content."""
        return [
            self._chunk(
                [
                    ChatChunkChoice(
                        index=s.index,
                        delta=DeltaMessage(
                            role="assistant", content="", prompt_token_ids=self._prompt_ids(s)
                        ),
                    )
                ]
            )
            for s in states
        ]

    def chunk(self, state: ChoiceState, update: ChoiceUpdate) -> ChatCompletionChunk | None:
        """The chunk for one update, or None when it has nothing to send yet."""
        if not (update.text or update.finish_reason or self._logprobs or self._token_ids):
            return None
        logprobs = None
        if self._logprobs:
            content = self._fmt.chat(
                update.token_ids, update.logprobs, update.top_logprobs, self._num_top
            )
            logprobs = ChatLogprobs(content=content)
        delta = DeltaMessage(
            content=update.text or None,
            completion_token_ids=update.token_ids if self._token_ids else None,
        )
        return self._chunk(
            [
                ChatChunkChoice(
                    index=update.index,
                    delta=delta,
                    logprobs=logprobs,
                    finish_reason=update.finish_reason,
                )
            ]
        )

    def usage_chunk(self, use: Usage) -> ChatCompletionChunk:
        """The last chunk with stream_options.include_usage: no choices, the usage."""
        return self._chunk([], use)

    def response(self, states: Sequence[ChoiceState], use: Usage) -> ChatCompletionResponse:
        """The whole non-streamed response."""
        choices = []
        for s in states:
            logprobs = None
            if self._logprobs:
                content = self._fmt.chat(
                    s.token_ids, s.logprobs, s.top_logprobs or None, self._num_top
                )
                logprobs = ChatLogprobs(content=content)
            message = ChatMessageOut(
                content=s.text,
                prompt_token_ids=self._prompt_ids(s),
                completion_token_ids=s.token_ids if self._token_ids else None,
            )
            choices.append(
                ChatChoice(
                    index=s.index, message=message, logprobs=logprobs, finish_reason=s.finish_reason
                )
            )
        return ChatCompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=use
        )


class CompletionRenderer:
    """Completions output: `text_completion` objects, whole or as stream chunks."""

    def __init__(
        self,
        response_id: str,
        model: str,
        req: CompletionRequest,
        prompts: Sequence[Prompt],
        formatter: LogprobFormatter,
    ) -> None:
        self.id, self.model, self.created = response_id, model, int(time.time())
        self._num_top = req.logprobs
        self._token_ids = bool(req.return_token_ids)
        self._prompts = prompts
        self._fmt = formatter
        self._offsets: dict[int, int] = {}  # choice index -> text offset of its next token
        self._started: set[int] = set()  # choices whose first chunk went out

    def _prompt_ids(self, state: ChoiceState) -> list[int] | None:
        return self._prompts[state.prompt_index].token_ids if self._token_ids else None

    def _response(
        self, choices: list[CompletionChoice], use: Usage | None = None
    ) -> CompletionResponse:
        return CompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=use
        )

    def _logprobs(
        self,
        index: int,
        token_ids: Sequence[int],
        logprobs: Sequence[float],
        top: Sequence[Sequence[tuple[int, float]]] | None,
    ) -> CompletionLogprobs | None:
        if self._num_top is None:
            return None
        out, self._offsets[index] = self._fmt.completion(
            token_ids, logprobs, top, self._num_top, self._offsets.get(index, 0)
        )
        return out

    def head(self, states: Sequence[ChoiceState]) -> list[CompletionResponse]:
        """Nothing: a completions stream starts with its first text."""
        return []

    def chunk(self, state: ChoiceState, update: ChoiceUpdate) -> CompletionResponse | None:
        """The chunk for one update, or None when it has nothing to send yet."""
        logprobs = self._logprobs(
            update.index, update.token_ids, update.logprobs, update.top_logprobs
        )
        if not (update.text or update.finish_reason or logprobs or self._token_ids):
            return None
        first = update.index not in self._started
        self._started.add(update.index)
        choice = CompletionChoice(
            index=update.index,
            text=update.text,
            logprobs=logprobs,
            finish_reason=update.finish_reason,
            prompt_token_ids=self._prompt_ids(state) if first else None,
            completion_token_ids=update.token_ids if self._token_ids else None,
        )
        return self._response([choice])

    def usage_chunk(self, use: Usage) -> CompletionResponse:
        """The last chunk with stream_options.include_usage: no choices, the usage."""
        return self._response([], use)

    def response(self, states: Sequence[ChoiceState], use: Usage) -> CompletionResponse:
        """The whole non-streamed response."""
        choices = []
        for s in states:
            logprobs = self._logprobs(s.index, s.token_ids, s.logprobs, s.top_logprobs or None)
            choices.append(
                CompletionChoice(
                    index=s.index,
                    text=s.text,
                    logprobs=logprobs,
                    finish_reason=s.finish_reason,
                    prompt_token_ids=self._prompt_ids(s),
                    completion_token_ids=s.token_ids if self._token_ids else None,
                )
            )
        return self._response(choices, use)
