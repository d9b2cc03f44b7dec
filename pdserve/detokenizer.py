"""Streaming detokenization: generated ids in, newly completed text out."""

from __future__ import annotations

from collections.abc import Sequence

from pdserve.tokenizer import Tokenizer

_PROMPT_CONTEXT = 5  # prompt tokens decoded ahead of the output, for spacing at its start
_MAX_HELD = 3  # a UTF-8 character has at most 4 bytes, so at most 3 tokens of one are held back


class IncrementalDetokenizer:
    """Generated ids in, newly completed text out.

    Decodes only a window: ids[prefix:read] is text already emitted (context, so tokenizers that
    drop a leading space decode the same way), ids[read:] is pending. Each step decodes the
    window with and without the pending ids and emits the difference, holding back the last
    few ids while their text ends mid-character (U+FFFD). Cost is O(new ids) amortized.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids = list(prompt_ids[-_PROMPT_CONTEXT:]) if prompt_ids else []
        self._prefix = 0
        self._read = len(self._ids)

    def _decode(self, end: int) -> str:
        return self._tokenizer.decode(self._ids[self._prefix : end], self._skip)

    def step(self, new_ids: Sequence[int]) -> str:
        """Append generated ids; return the text they complete (possibly "")."""
        self._ids.extend(new_ids)
        end = len(self._ids)
        if end == self._read:
            return ""
        for cut in range(end, max(self._read, end - _MAX_HELD - 1), -1):
            text = self._decode(cut)
            if not text.endswith("\ufffd"):
                break
        else:
            if cut != end - _MAX_HELD:
                return ""  # a character may still be completing
            # _MAX_HELD more ids have not completed the character open at `cut`, so it is
            # invalid and stays U+FFFD whatever comes next: emit up to there.
        return self._advance(text, cut)

    def flush(self) -> str:
        """The text still held back, once generation has ended."""
        return self._advance(self._decode(len(self._ids)), len(self._ids))

    def _advance(self, text: str, cut: int) -> str:
        emitted = self._decode(self._read)
        if len(text) <= len(emitted):
            return ""  # ids that decode to nothing (skipped specials) stay pending as context
        self._prefix, self._read = self._read, cut
        del self._ids[: self._prefix]
        self._read -= self._prefix
        self._prefix = 0
        return text[len(emitted) :]
