"""Token logprobs in OpenAI's two formats: chat's `content[]` entries and completions' lists."""

from __future__ import annotations

from collections.abc import Sequence

from pdserve.openai.responses import ChatLogprobEntry, CompletionLogprobs, TopLogprob
from pdserve.tokenizer import BYTE_OFFSET, ByteTokenizer, Tokenizer

# JSON has no -inf; OpenAI and vLLM report impossible tokens as -9999.0.
MIN_LOGPROB = -9999.0

TopLogprobs = Sequence[Sequence[tuple[int, float]]] | None


def _clamp(logprob: float) -> float:
    return logprob if logprob >= MIN_LOGPROB else MIN_LOGPROB  # NaN-safe: NaN becomes the floor


class LogprobFormatter:
    """Renders token ids with their logprobs; caches each token's text and bytes."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._raw_bytes = isinstance(tokenizer, ByteTokenizer)
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def token(self, token_id: int) -> tuple[str, list[int]]:
        """The token's text (special tokens included) and its UTF-8 bytes.

        A token holding part of a multi-byte character decodes to U+FFFD; its bytes are exact
        for the byte tokenizer and those of U+FFFD otherwise.
        """
        hit = self._cache.get(token_id)
        if hit is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            if self._raw_bytes and token_id >= BYTE_OFFSET:
                raw = [token_id - BYTE_OFFSET]
            else:
                raw = list(text.encode("utf-8"))
            hit = self._cache[token_id] = (text, raw)
        return hit

    def chat(
        self, token_ids: Sequence[int], logprobs: Sequence[float], top: TopLogprobs, num_top: int
    ) -> list[ChatLogprobEntry]:
        """Entries of chat `logprobs.content`, each with up to `num_top` alternatives."""
        entries = []
        for j, (token_id, logprob) in enumerate(zip(token_ids, logprobs)):
            text, raw = self.token(token_id)
            alternatives = []
            for alt_id, alt_logprob in (top[j] if top else ())[:num_top]:
                alt_text, alt_raw = self.token(alt_id)
                alternatives.append(
                    TopLogprob(token=alt_text, logprob=_clamp(alt_logprob), bytes=alt_raw)
                )
            entries.append(
                ChatLogprobEntry(
                    token=text, logprob=_clamp(logprob), bytes=raw, top_logprobs=alternatives
                )
            )
        return entries

    def completion(
        self,
        token_ids: Sequence[int],
        logprobs: Sequence[float],
        top: TopLogprobs,
        num_top: int,
        text_offset: int,
    ) -> tuple[CompletionLogprobs, int]:
        """Completions logprobs of these tokens, and the text offset after them.

        `text_offset` is the character offset of the first token in the choice's text. Each
        top_logprobs dict holds up to `num_top` alternatives plus the sampled token, as OpenAI's
        legacy API does.
        """
        out = CompletionLogprobs()
        for j, (token_id, logprob) in enumerate(zip(token_ids, logprobs)):
            text, _ = self.token(token_id)
            alternatives = {
                self.token(a)[0]: _clamp(lp) for a, lp in (top[j] if top else ())[:num_top]
            }
            alternatives.setdefault(text, _clamp(logprob))
            out.tokens.append(text)
            out.token_logprobs.append(_clamp(logprob))
            out.top_logprobs.append(alternatives)
            out.text_offset.append(text_offset)
            text_offset += len(text)
        return out, text_offset
