"""OpenAIServing end to end against a scripted engine at the process boundary."""

from __future__ import annotations

from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from pdserve.openai.inputs import chat_prompt
from pdserve.openai.protocol import ChatCompletionRequest
from pdserve.tokenizer import ByteTokenizer
from tests.openai.fake_engine import (
    EOS,
    ScriptedEngine,
    chat_body,
    contents,
    ids,
    logprob_of,
    make_serving,
    run,
    stream_events,
    user,
)

HI = user("hi")
PROMPT_IDS = chat_prompt(ByteTokenizer(), ChatCompletionRequest(messages=HI)).token_ids


def test_chat_non_stream() -> None:
    engine = ScriptedEngine(num_cached_tokens=16)
    serving = make_serving(engine)
    body = run(serving.chat(chat_body()))
    ChatCompletion.model_validate(body)
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    assert body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": "Hello", "refusal": None}
    assert (choice["finish_reason"], choice["logprobs"]) == ("stop", None)
    assert body["usage"] == {
        "prompt_tokens": len(PROMPT_IDS),
        "completion_tokens": 6,  # "Hello" and EOS
        "total_tokens": len(PROMPT_IDS) + 6,
        "prompt_tokens_details": {"cached_tokens": 16},
    }
    ((rid, (prompt, params)),) = engine.requests.items()
    assert rid == f"{body['id']}-0" and prompt == PROMPT_IDS
    assert params.max_tokens == 256 - len(PROMPT_IDS)
    assert engine.finished == [rid] and engine.aborted == [] and serving._num_active == 0


def test_chat_stream_with_usage() -> None:
    serving = make_serving(ScriptedEngine())
    body = chat_body(stream=True, stream_options={"include_usage": True})
    events = run(stream_events(serving, body))
    assert events[-1] == "[DONE]"
    for e in events[:-1]:
        ChatCompletionChunk.model_validate(e)
        assert e["object"] == "chat.completion.chunk" and e["id"] == events[0]["id"]
    assert events[0]["choices"] == [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
    ]
    assert "".join(filter(None, contents(events))) == "Hello"
    assert [c["finish_reason"] for e in events[1:-2] for c in e["choices"]][-1] == "stop"
    assert events[-2]["choices"] == []
    assert events[-2]["usage"]["completion_tokens"] == 6


def test_n_choices_get_their_own_ids_and_seeds() -> None:
    engine = ScriptedEngine(script=lambda rid, prompt, p: ids(f"s{p.seed}") + [EOS])
    serving = make_serving(engine)
    body = run(serving.chat(chat_body(n=3, seed=10)))
    assert [c["message"]["content"] for c in body["choices"]] == ["s10", "s11", "s12"]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert sorted(engine.requests) == [f"{body['id']}-{i}" for i in range(3)]
    usage = body["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (len(PROMPT_IDS), 12)


def test_stop_string_ends_the_choice_and_aborts_its_request() -> None:
    engine = ScriptedEngine(script=lambda *a: ids("Hello world, and more"))
    body = run(make_serving(engine).chat(chat_body(stop=["o w", "zzz"])))
    choice = body["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"]) == ("Hell", "stop")
    assert body["usage"]["completion_tokens"] == len("Hello w")
    assert engine.aborted == [f"{body['id']}-0"] and engine.finished == []


def test_streamed_stop_string_holds_back_its_start() -> None:
    engine = ScriptedEngine(script=lambda *a: ids("Hello world"))
    serving = make_serving(engine)
    events = run(stream_events(serving, chat_body(stream=True, stop="o w")))
    # "o" and " " were held back, then dropped with the stop string they started.
    assert contents(events) == ["", "H", "e", "l", "l", None]
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert len(engine.aborted) == 1 and serving._num_active == 0
    events = run(
        stream_events(serving, chat_body(stream=True, stop="o w", include_stop_str_in_output=True))
    )
    assert "".join(filter(None, contents(events))) == "Hello w"


def test_held_back_text_is_released_when_no_stop_follows() -> None:
    engine = ScriptedEngine(script=lambda *a: ids("abab") + [EOS])
    events = run(stream_events(make_serving(engine), chat_body(stream=True, stop="abc")))
    # "ab" could start "abc" until the next "a" shows it does not; the last "ab" is flushed.
    assert contents(events) == ["", "ab", "ab"]


def test_utf8_split_across_tokens() -> None:
    engine = ScriptedEngine(script=lambda *a: ids("héllo ✓") + [EOS])
    events = run(stream_events(make_serving(engine), chat_body(stream=True)))
    text = contents(events)
    assert "".join(filter(None, text)) == "héllo ✓" and not any("\ufffd" in (t or "") for t in text)


def test_length_finish() -> None:
    body = run(make_serving().chat(chat_body(max_tokens=3)))
    assert body["choices"][0]["message"]["content"] == "Hel"
    assert body["choices"][0]["finish_reason"] == "length"


def test_chat_logprobs() -> None:
    body = run(make_serving().chat(chat_body(logprobs=True, top_logprobs=2, max_tokens=2)))
    content = body["choices"][0]["logprobs"]["content"]
    assert [(e["token"], e["logprob"]) for e in content] == [
        ("H", logprob_of(0)),
        ("e", logprob_of(1)),
    ]
    assert [t["token"] for t in content[0]["top_logprobs"]] == ["H", "?"]
    events = run(stream_events(make_serving(), chat_body(stream=True, logprobs=True)))
    streamed = [c["logprobs"]["content"] for e in events[1:-1] for c in e["choices"]]
    assert [[x["token"] for x in lp] for lp in streamed] == [
        ["H"],
        ["e"],
        ["l"],
        ["l"],
        ["o"],
        ["</s>"],
    ]
    assert all(lp[0]["top_logprobs"] == [] for lp in streamed)


def test_return_token_ids() -> None:
    body = run(make_serving().chat(chat_body(return_token_ids=True)))
    message = body["choices"][0]["message"]
    assert message["prompt_token_ids"] == PROMPT_IDS
    assert message["completion_token_ids"] == ids("Hello") + [EOS]
    events = run(stream_events(make_serving(), chat_body(stream=True, return_token_ids=True)))
    deltas = [c["delta"] for e in events[:-1] for c in e["choices"]]
    assert deltas[0]["prompt_token_ids"] == PROMPT_IDS
    assert sum((d.get("completion_token_ids", []) for d in deltas), []) == ids("Hello") + [EOS]


def test_completions_non_stream_and_echo() -> None:
    body = run(make_serving().completions({"prompt": "ab", "max_tokens": 2}))
    Completion.model_validate(body)
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"] == [
        {"index": 0, "text": "He", "logprobs": None, "finish_reason": "length"}
    ]
    assert body["usage"]["prompt_tokens"] == 2
    body = run(make_serving().completions({"prompt": "ab", "echo": True, "max_tokens": 2}))
    assert body["choices"][0]["text"] == "abHe"
    body = run(make_serving().completions({"prompt": [ids("cd")], "echo": True, "max_tokens": 1}))
    assert body["choices"][0]["text"] == "cdH"


def test_completions_stream_logprobs_and_token_ids() -> None:
    body = {
        "prompt": ids("ab"),
        "stream": True,
        "logprobs": 1,
        "return_token_ids": True,
        "stream_options": {"include_usage": True},
    }
    events = run(stream_events(make_serving(), body, "completions"))
    chunks = [c for e in events[:-2] for c in e["choices"]]
    assert "".join(c["text"] for c in chunks) == "Hello"
    offsets = [o for c in chunks for o in c["logprobs"]["text_offset"]]
    assert offsets == [0, 1, 2, 3, 4, 5]
    assert chunks[0]["logprobs"]["top_logprobs"] == [{"H": logprob_of(0)}]
    assert chunks[0]["prompt_token_ids"] == ids("ab")
    assert all("prompt_token_ids" not in c for c in chunks[1:])
    assert [t for c in chunks for t in c["completion_token_ids"]] == ids("Hello") + [EOS]
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 6


def test_batch_prompts_fan_out_n_choices_each() -> None:
    engine = ScriptedEngine(script=lambda rid, prompt, p: prompt[::-1] + [EOS], num_cached_tokens=1)
    serving = make_serving(engine)
    body = run(serving.completions({"prompt": ["ab", "cde"], "n": 2, "seed": 3}))
    assert [(c["index"], c["text"]) for c in body["choices"]] == [
        (0, "ba"),
        (1, "ba"),
        (2, "edc"),
        (3, "edc"),
    ]
    seeds = [engine.requests[f"{body['id']}-{i}"][1].seed for i in range(4)]
    assert seeds == [3, 4, 3, 4]
    assert body["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 14,
        "total_tokens": 19,
        "prompt_tokens_details": {"cached_tokens": 2},
    }
    events = run(stream_events(serving, {"prompt": ["ab", "cde"], "stream": True}, "completions"))
    texts = {}
    for e in events[:-1]:
        for c in e["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
    assert texts == {0: "ba", 1: "edc"}


def test_stop_string_closes_only_its_choice() -> None:
    engine = ScriptedEngine(script=lambda rid, prompt, p: ids(f"x{p.seed}y") + [EOS])
    body = run(make_serving(engine).chat(chat_body(n=2, seed=0, stop="0")))
    choices = [(c["message"]["content"], c["finish_reason"]) for c in body["choices"]]
    assert choices == [("x", "stop"), ("x1y", "stop")]
    assert engine.aborted == [f"{body['id']}-0"] and engine.finished == [f"{body['id']}-1"]
