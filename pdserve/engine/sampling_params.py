"""Per-request sampling parameters, validated once when a request is created."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import NoReturn

_MAX_LOGPROBS = 20
_GREEDY_TEMPERATURE = 1e-5


_MAX_ID = 2**31  # token ids and counts travel as int32-sized values


@dataclass(frozen=True)
class SamplingParams:
    """How one request's next tokens are chosen; defaults follow vLLM and the OpenAI API.

    Attributes:
        temperature: Divides the logits; below 1e-5 means greedy (argmax).
        top_p: Keep the smallest set of most likely tokens whose probability mass is >= top_p.
        top_k: Keep the k most likely tokens; 0 or -1 disables.
        min_p: Drop tokens whose probability is below min_p times the top token's.
        repetition_penalty: HF style, over prompt and output tokens; 1.0 disables.
        presence_penalty: OpenAI style, subtracted once from every token already in the output.
        frequency_penalty: OpenAI style, subtracted per occurrence of a token in the output.
        seed: Seeds the request's own generator, so its tokens do not depend on the batch.
        max_tokens: Most output tokens to generate.
        min_tokens: Output tokens to generate before EOS or a stop token may be sampled.
        stop_token_ids: Token ids that end the request (besides EOS).
        ignore_eos: Keep generating after EOS.
        logprobs: Number of top alternatives to return with each token's logprob (0 to 20);
            0 returns only the chosen token's logprob, None returns none.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self) -> None:
        # Written as "not (valid)" so that NaN fails every check.
        if not (_is_real(self.temperature) and 0.0 <= self.temperature < math.inf):
            _fail("temperature", self.temperature, "a finite number >= 0")
        if not (_is_real(self.top_p) and 0.0 < self.top_p <= 1.0):
            _fail("top_p", self.top_p, "in (0, 1]")
        if not (_is_int(self.top_k) and -1 <= self.top_k < _MAX_ID):
            _fail("top_k", self.top_k, "an int in [-1, 2**31) (0 or -1 disables)")
        if not (_is_real(self.min_p) and 0.0 <= self.min_p <= 1.0):
            _fail("min_p", self.min_p, "in [0, 1]")
        if not (_is_real(self.repetition_penalty) and 0.0 < self.repetition_penalty < math.inf):
            _fail("repetition_penalty", self.repetition_penalty, "a finite number > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (_is_real(value) and -2.0 <= value <= 2.0):
                _fail(name, value, "in [-2, 2]")
        if self.seed is not None and not (_is_int(self.seed) and 0 <= self.seed < 2**64):
            _fail("seed", self.seed, "an int in [0, 2**64)")
        if not (_is_int(self.max_tokens) and self.max_tokens >= 1):
            _fail("max_tokens", self.max_tokens, "an int >= 1")
        if not (_is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens):
            _fail("min_tokens", self.min_tokens, f"an int in [0, max_tokens={self.max_tokens}]")
        stop = self.stop_token_ids
        if not (isinstance(stop, (tuple, list)) and all(_is_int(t) and 0 <= t < _MAX_ID
                                                         for t in stop)):  # fmt: skip
            _fail("stop_token_ids", stop, "a sequence of ints in [0, 2**31)")
        # Accept a list from JSON but store a tuple, so the params stay hashable.
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in stop))
        if not isinstance(self.ignore_eos, bool):
            _fail("ignore_eos", self.ignore_eos, "a bool")
        if self.logprobs is not None and not (
            _is_int(self.logprobs) and 0 <= self.logprobs <= _MAX_LOGPROBS
        ):
            _fail("logprobs", self.logprobs, f"an int in [0, {_MAX_LOGPROBS}]")

    @property
    def greedy(self) -> bool:
        """True when the request takes the argmax token instead of sampling."""
        return self.temperature < _GREEDY_TEMPERATURE


def _is_int(value: object) -> bool:
    # bool is a subclass of int, but `top_k=True` is a client bug, not a 1.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _fail(field: str, value: object, expected: str) -> NoReturn:
    raise ValueError(f"{field} must be {expected}, got {value!r}")
