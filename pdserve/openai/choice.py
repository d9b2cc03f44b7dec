"""One choice of a request: its engine deltas turned into text, with stop strings applied."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.detokenizer import IncrementalDetokenizer
from pdserve.openai.engine_protocol import EngineError, TokenDelta
from pdserve.openai.stop import StopStringMatcher
from pdserve.tokenizer import Tokenizer


class RequestAborted(EngineError):
    """The engine finished a request with "abort" that this layer did not ask to stop."""


@dataclass
class ChoiceUpdate:
    """What one engine delta added to a choice, ready to send."""

    index: int
    text: str  # new text that is safe to send (stop strings applied)
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]] | None
    finish_reason: str | None  # "stop" or "length" on the choice's last update


class ChoiceState:
    """Detokenizes one choice incrementally and applies its stop strings.

    Stop strings are not checked before `min_tokens` tokens, like EOS and stop tokens in the
    engine. `prefix` (the prompt, for completions' echo) is sent with the first update and is
    never matched against stop strings.
    """

    def __init__(
        self,
        index: int,
        prompt_index: int,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int],
        stop: Sequence[str] = (),
        include_stop_str: bool = False,
        skip_special_tokens: bool = True,
        min_tokens: int = 0,
        prefix: str = "",
    ) -> None:
        self.index = index
        self.prompt_index = prompt_index  # which prompt of a batch this choice continues
        self.text = ""  # everything sent so far
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []
        self.finish_reason: str | None = None
        self.num_cached_tokens = 0
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
        self._stop = StopStringMatcher(stop, include_stop_str) if stop else None
        self._min_tokens = min_tokens
        self._prefix = prefix

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def stopped_by_string(self) -> bool:
        """True once a stop string ended the choice: the engine request must be closed."""
        return self._stop is not None and self._stop.matched is not None

    def update(self, delta: TokenDelta) -> ChoiceUpdate:
        """Apply one engine delta; raises `RequestAborted` on an engine-side abort."""
        assert not self.finished, f"choice {self.index} got a delta after finishing"
        if delta.finish_reason == "abort":
            raise RequestAborted("the engine aborted the request (is the server shutting down?)")
        self.num_cached_tokens = delta.num_cached_tokens
        self.token_ids.extend(delta.token_ids)
        self.logprobs.extend(delta.logprobs)
        if delta.top_logprobs is not None:
            self.top_logprobs.extend(delta.top_logprobs)
        ended = delta.finish_reason is not None
        text = self._detok.step(delta.token_ids)
        if ended:
            text += self._detok.flush()
        if self._stop is not None:
            if len(self.token_ids) >= self._min_tokens:
                text = self._stop.feed(text)
            if self._stop.matched is not None:
                self.finish_reason = "stop"
            elif ended:
                text += self._stop.flush()
        if self.finish_reason is None:
            self.finish_reason = delta.finish_reason
        text, self._prefix = self._prefix + text, ""
        self.text += text
        return ChoiceUpdate(
            self.index,
            text,
            list(delta.token_ids),
            list(delta.logprobs),
            delta.top_logprobs,
            self.finish_reason,
        )
