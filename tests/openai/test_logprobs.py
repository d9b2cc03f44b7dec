"""Logprobs in OpenAI's chat and completions formats."""

from __future__ import annotations

import math

from openai.types.chat import ChatCompletionTokenLogprob
from openai.types.completion_choice import Logprobs

from pdserve.openai.logprobs import MIN_LOGPROB, LogprobFormatter
from pdserve.tokenizer import ByteTokenizer
from tests.openai.fake_engine import ids

FMT = LogprobFormatter(ByteTokenizer())
A, B, C = ids("abc")
EOS = 2


def test_chat_entries() -> None:
    top = [[(A, -0.1), (B, -2.0), (C, -3.0)], [(B, -0.5), (A, -1.0), (C, -4.0)]]
    entries = FMT.chat([A, B], [-0.1, -0.5], top, num_top=2)
    assert [e.model_dump() for e in entries] == [
        {
            "token": "a",
            "logprob": -0.1,
            "bytes": [97],
            "top_logprobs": [
                {"token": "a", "logprob": -0.1, "bytes": [97]},
                {"token": "b", "logprob": -2.0, "bytes": [98]},
            ],
        },
        {
            "token": "b",
            "logprob": -0.5,
            "bytes": [98],
            "top_logprobs": [
                {"token": "b", "logprob": -0.5, "bytes": [98]},
                {"token": "a", "logprob": -1.0, "bytes": [97]},
            ],
        },
    ]
    for e in entries:  # the official client's schema accepts them
        ChatCompletionTokenLogprob.model_validate(e.model_dump())


def test_chat_without_alternatives() -> None:
    (entry,) = FMT.chat([A], [-0.25], None, num_top=0)
    assert entry.top_logprobs == []
    (entry,) = FMT.chat([A], [-0.25], [[(A, -0.25), (B, -1.0)]], num_top=0)
    assert entry.top_logprobs == []


def test_special_tokens_partial_bytes_and_infinities() -> None:
    e_acute = ids("é")  # two byte tokens, each half a character
    entries = FMT.chat([EOS, *e_acute], [-math.inf, math.nan, -1.0], None, 0)
    assert [(e.token, e.bytes, e.logprob) for e in entries] == [
        ("</s>", list(b"</s>"), MIN_LOGPROB),
        ("\ufffd", [0xC3], MIN_LOGPROB),
        ("\ufffd", [0xA9], -1.0),
    ]


def test_completion_lists_and_offsets() -> None:
    top = [[(B, -0.1), (A, -1.5)], [(C, -0.2), (B, -3.0)]]
    out, offset = FMT.completion([A, EOS], [-1.5, -7.0], top, num_top=1, text_offset=5)
    assert out.model_dump() == {
        "tokens": ["a", "</s>"],
        "token_logprobs": [-1.5, -7.0],
        # the top alternative, plus the sampled token as OpenAI's legacy API adds it
        "top_logprobs": [{"b": -0.1, "a": -1.5}, {"c": -0.2, "</s>": -7.0}],
        "text_offset": [5, 6],
    }
    assert offset == 10
    Logprobs.model_validate(out.model_dump())


def test_completion_logprobs_zero_gives_the_sampled_token() -> None:
    out, offset = FMT.completion([A, B], [-0.5, -0.25], None, num_top=0, text_offset=0)
    assert out.top_logprobs == [{"a": -0.5}, {"b": -0.25}]
    assert out.text_offset == [0, 1] and offset == 2
