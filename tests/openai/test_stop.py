"""Stop strings: matching across token boundaries, held-back text, and choice finishing."""

from __future__ import annotations

import random

import pytest

from pdserve.openai.choice import ChoiceState, RequestAborted
from pdserve.openai.engine_protocol import TokenDelta
from pdserve.openai.stop import StopStringMatcher
from pdserve.tokenizer import ByteTokenizer
from tests.openai.fake_engine import ids


def feed_all(matcher: StopStringMatcher, pieces: list[str]) -> list[str]:
    return [matcher.feed(p) for p in pieces]


def test_stop_split_across_pieces_is_held_then_cut() -> None:
    m = StopStringMatcher(["world"])
    assert feed_all(m, ["Hello wo", "r", "ld!"]) == ["Hello ", "", ""]
    assert m.matched == "world"
    assert m.feed("more") == "" and m.flush() == ""


def test_held_text_is_released_when_it_stops_matching() -> None:
    m = StopStringMatcher(["world"])
    assert m.feed("wo") == "" and m.held == "wo"
    assert m.feed("rk") == "work" and m.held == ""
    assert m.feed("w") == "" and m.flush() == "w"
    assert m.matched is None


def test_include_stop_str_keeps_the_stop_string() -> None:
    m = StopStringMatcher(["</end>"], include_stop_str=True)
    assert feed_all(m, ["a</e", "nd>b"]) == ["a", "</end>"]


def test_the_match_that_ends_first_wins() -> None:
    # As a character-by-character stream would see it: "y" completes before "xyz".
    assert StopStringMatcher(["xyz", "y"]).feed("axyz") == "ax"
    # Two matches ending together: the longer one (starting first) is cut.
    m = StopStringMatcher(["c", "bc"])
    assert m.feed("abc") == "a" and m.matched == "bc"


def test_overlapping_prefixes() -> None:
    m = StopStringMatcher(["abc", "bcd"])
    assert feed_all(m, ["xab", "cd"]) == ["x", ""]
    assert m.matched == "abc"
    m = StopStringMatcher(["aab"])
    assert feed_all(m, ["a", "a", "a", "c"]) == ["", "", "a", "aac"]


def test_empty_stop_string_is_an_error() -> None:
    with pytest.raises(ValueError, match="empty"):
        StopStringMatcher(["x", ""])


def char_by_char(text: str, stops: list[str], include: bool) -> str:
    m = StopStringMatcher(stops, include)
    out = "".join(m.feed(c) for c in text)
    return out + m.flush()


def test_output_does_not_depend_on_how_text_is_split() -> None:
    rng = random.Random(0)
    for _ in range(500):
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 12)))
        stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 3))) for _ in range(2)]
        include = rng.random() < 0.5
        cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, len(text))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        m = StopStringMatcher(stops, include)
        out = "".join(m.feed(p) for p in pieces) + m.flush()
        assert out == char_by_char(text, stops, include), (text, stops, pieces)


def delta(token_ids: list[int], finish: str | None = None, cached: int = 0) -> TokenDelta:
    return TokenDelta(token_ids, [-1.0] * len(token_ids), None, finish, 3, cached)


def make_choice(**kwargs) -> ChoiceState:
    return ChoiceState(0, 0, ByteTokenizer(), ids("Hi:"), **kwargs)


def test_choice_stop_string_split_across_tokens() -> None:
    choice = make_choice(stop=["o w"])
    texts = []
    for token in ids("Hello world"):
        update = choice.update(delta([token]))
        texts.append(update.text)
        if update.finish_reason:
            break
    # "o" and " " are held while they could start "o w"; "w" completes the match.
    assert texts == ["H", "e", "l", "l", "", "", ""]
    assert choice.text == "Hell" and choice.finish_reason == "stop"
    assert choice.stopped_by_string and len(choice.token_ids) == 7


def test_choice_holds_partial_utf8_and_flushes_on_finish() -> None:
    choice = make_choice(stop=["lo"])
    tokens = ids("é") + ids("l")
    assert [choice.update(delta([t])).text for t in tokens] == ["", "é", ""]
    last = choice.update(delta(ids("!"), finish="length"))
    assert (last.text, last.finish_reason, choice.text) == ("l!", "length", "él!")
    assert not choice.stopped_by_string


def test_choice_include_stop_str_and_echo_prefix() -> None:
    choice = make_choice(stop=["lo"], include_stop_str=True, prefix="Hi:")
    updates = [choice.update(delta([t])) for t in ids("Hel")]
    assert [u.text for u in updates] == ["Hi:H", "e", ""]
    assert choice.update(delta(ids("o"))).text == "lo" and choice.text == "Hi:Helo"


def test_stop_strings_wait_for_min_tokens() -> None:
    choice = make_choice(stop=["a"], min_tokens=3)
    texts = [choice.update(delta([t])).text for t in ids("aaa")]
    assert texts == ["a", "a", ""] and choice.finish_reason == "stop"


def test_choice_records_tokens_and_cached_count() -> None:
    choice = make_choice()
    choice.update(delta(ids("ab"), cached=2))
    update = choice.update(delta([2], finish="stop", cached=2))  # EOS decodes to nothing
    assert (update.text, update.finish_reason) == ("", "stop")
    assert choice.token_ids == ids("ab") + [2] and choice.num_cached_tokens == 2


def test_engine_abort_is_an_error() -> None:
    with pytest.raises(RequestAborted):
        make_choice().update(delta(ids("a"), finish="abort"))
