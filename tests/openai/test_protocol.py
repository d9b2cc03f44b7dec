"""Request validation: bad bodies give OpenAI-style 4xx errors naming the field at fault."""

from __future__ import annotations

import pytest

from pdserve.openai.protocol import ChatCompletionRequest, CompletionRequest
from tests.openai.fake_engine import make_serving, raises_openai, user

MSG = user("hi")
INVALID = "invalid_request_error"

# (body, status, param) for /v1/chat/completions; "messages" is added unless the body has it.
CHAT_BAD = [
    ({"messages": None}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": [{"content": "hi"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ({"messages": user("x") + [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages"),
    ({"messages": user("x" * 300)}, 400, "messages"),  # longer than max_model_len
    ({"model": "gpt-4o"}, 404, "model"),
    ({"model": 7}, 400, "model"),
    ({"temperature": "hot"}, 400, "temperature"),
    ({"temperature": -1}, 400, "temperature"),
    ({"top_p": 0}, 400, "top_p"),
    ({"top_p": 1.5}, 400, "top_p"),
    ({"top_k": -2}, 400, "top_k"),
    ({"top_k": 1.5}, 400, "top_k"),
    ({"min_p": 2}, 400, "min_p"),
    ({"presence_penalty": 3}, 400, "presence_penalty"),
    ({"frequency_penalty": -2.5}, 400, "frequency_penalty"),
    ({"repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"n": 0}, 400, "n"),
    ({"n": 17}, 400, "n"),
    ({"n": True}, 400, "n"),
    ({"stream": "yes"}, 400, "stream"),
    ({"stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, 400,
     "stream_options.include_usage"),
    ({"stop": 5}, 400, "stop"),
    ({"stop": [""]}, 400, "stop"),
    ({"stop": [str(i) for i in range(17)]}, 400, "stop"),
    ({"stop_token_ids": [-1]}, 400, "stop_token_ids"),
    ({"stop_token_ids": "2"}, 400, "stop_token_ids"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"max_tokens": 1000}, 400, "max_tokens"),
    ({"max_tokens": "10"}, 400, "max_tokens"),
    ({"max_completion_tokens": -1}, 400, "max_completion_tokens"),
    ({"max_tokens": 5, "max_completion_tokens": 1000}, 400, "max_completion_tokens"),
    ({"min_tokens": 10, "max_tokens": 5}, 400, "min_tokens"),
    ({"seed": -1}, 400, "seed"),
    ({"seed": "1"}, 400, "seed"),
    ({"logprobs": 1}, 400, "logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ({"top_logprobs": 2}, 400, "top_logprobs"),
    ({"ignore_eos": "no"}, 400, "ignore_eos"),
    ({"chat_template_kwargs": "x"}, 400, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"messages": []}}, 400, "chat_template_kwargs"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ({"tool_choice": "required"}, 400, "tool_choice"),
    ({"logit_bias": {"5": 1}}, 400, "logit_bias"),
    ({"response_format": {"type": "json_object"}}, 400, "response_format"),
]  # fmt: skip

COMPLETION_BAD = [
    ({}, 400, "prompt"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [[]]}, 400, "prompt"),
    ({"prompt": [True, False]}, 400, "prompt"),
    ({"prompt": [[20, 21], "a"]}, 400, "prompt"),
    ({"prompt": [999]}, 400, "prompt"),
    ({"prompt": ["a", ""]}, 400, "prompt[1]"),
    ({"prompt": "ab", "max_tokens": 255}, 400, "max_tokens"),
    ({"prompt": "x" * 256}, 400, "prompt"),
    ({"prompt": "ab", "logprobs": 21}, 400, "logprobs"),
    ({"prompt": "ab", "logprobs": True}, 400, "logprobs"),
    ({"prompt": "ab", "echo": True, "logprobs": 1}, 400, "echo"),
    ({"prompt": "ab", "suffix": "z"}, 400, "suffix"),
    ({"prompt": "ab", "best_of": 2}, 400, "best_of"),
    ({"prompt": "ab", "model": "other"}, 404, "model"),
    ({"prompt": "ab", "temperature": None, "top_p": -1}, 400, "top_p"),
]


@pytest.mark.parametrize(("body", "status", "param"), CHAT_BAD)
def test_chat_rejects(body: dict, status: int, param: str) -> None:
    err = raises_openai(make_serving().chat({"messages": MSG, **body}))
    assert (err.status, err.param, err.type) == (status, param, INVALID), err.message
    assert err.error_body()["error"]["param"] == param
    assert err.message


@pytest.mark.parametrize(("body", "status", "param"), COMPLETION_BAD)
def test_completions_rejects(body: dict, status: int, param: str) -> None:
    err = raises_openai(make_serving().completions(body))
    assert (err.status, err.param, err.type) == (status, param, INVALID), err.message


def test_error_bodies_name_the_problem() -> None:
    serving = make_serving()
    err = raises_openai(serving.chat({"messages": MSG, "model": "gpt-4o"}))
    assert err.error_body() == {
        "error": {
            "message": "The model `gpt-4o` does not exist.",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }
    err = raises_openai(serving.chat({}))
    assert err.message == "'messages' is a required property"
    err = raises_openai(serving.chat({"messages": MSG, "temperature": -1}))
    assert err.message.startswith("temperature must be")
    err = raises_openai(serving.chat({"messages": MSG, "max_completion_tokens": 0}))
    assert err.message.startswith("max_completion_tokens must be")
    err = raises_openai(serving.chat({"messages": MSG, "max_tokens": 1000}))
    assert "maximum context length is 256 tokens" in err.message
    err = raises_openai(serving.chat(["not", "an", "object"]))
    assert (err.status, err.param) == (400, None)


def test_unknown_fields_and_nulls_are_accepted() -> None:
    nulls = {name: None for name in ChatCompletionRequest.model_fields if name != "messages"}
    req = ChatCompletionRequest.model_validate(
        {"messages": MSG, **nulls, "metadata": {"a": 1}, "store": False}
    )
    assert req.num_choices == 1 and req.stop_strings == [] and not req.include_usage
    nulls = {name: None for name in CompletionRequest.model_fields if name != "prompt"}
    assert CompletionRequest.model_validate({"prompt": "x", **nulls}).num_logprobs is None


def test_known_fields_parse() -> None:
    req = ChatCompletionRequest.model_validate({
        "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}], "x": 1}],
        "temperature": 0,  # an int where a float belongs is fine, as in JSON
        "stop": "END",
        "logprobs": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 5,
        "max_completion_tokens": 7,
    })  # fmt: skip
    assert req.temperature == 0.0 and req.stop_strings == ["END"] and req.include_usage
    assert req.num_logprobs == 0 and req.requested_max_tokens == 7
    assert req.messages[0].model_dump(exclude_none=True)["x"] == 1
    for prompt in ("a", ["a"], [20, 21], [[20, 21]], ["a", "b"]):
        assert CompletionRequest.model_validate({"prompt": prompt}).prompt == prompt


def test_models_list() -> None:
    body = make_serving().list_models()
    assert body["object"] == "list"
    assert [(m["id"], m["object"], m["max_model_len"]) for m in body["data"]] == [
        ("tiny", "model", 256)
    ]
