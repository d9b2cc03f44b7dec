"""Requests mapped to prompts and SamplingParams."""

from __future__ import annotations

import pytest

from pdserve.engine.sampling_params import SamplingParams
from pdserve.openai.errors import OpenAIError
from pdserve.openai.inputs import chat_prompt, choice_params, completion_prompts, sampling_params
from pdserve.openai.protocol import ChatCompletionRequest, CompletionRequest
from pdserve.tokenizer import ByteTokenizer
from tests.openai.fake_engine import ids, user

TOK = ByteTokenizer()


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": user("hi"), **fields})


def completion(**fields) -> CompletionRequest:
    return CompletionRequest.model_validate({"prompt": "hi", **fields})


def test_defaults_follow_sampling_params_and_fill_the_context() -> None:
    params = sampling_params(chat(), prompt_len=10, max_model_len=256, prompt_param="messages")
    assert params == SamplingParams(max_tokens=246)
    assert params.logprobs is None


def test_every_field_is_passed_on() -> None:
    req = chat(
        temperature=0.5,
        top_p=0.9,
        top_k=40,
        min_p=0.1,
        repetition_penalty=1.2,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        seed=7,
        min_tokens=2,
        ignore_eos=True,
        stop_token_ids=[5, 6],
        max_completion_tokens=20,
        logprobs=True,
        top_logprobs=3,
    )
    params = sampling_params(req, 10, 256, "messages")
    assert params == SamplingParams(
        temperature=0.5,
        top_p=0.9,
        top_k=40,
        min_p=0.1,
        repetition_penalty=1.2,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        seed=7,
        max_tokens=20,
        min_tokens=2,
        stop_token_ids=(5, 6),
        ignore_eos=True,
        logprobs=3,
    )


def test_logprobs_mapping() -> None:
    assert sampling_params(chat(logprobs=True), 1, 8, "m").logprobs == 0
    assert sampling_params(chat(logprobs=False, top_logprobs=0), 1, 8, "m").logprobs is None
    assert sampling_params(completion(logprobs=0), 1, 8, "p").logprobs == 0
    assert sampling_params(completion(logprobs=5), 1, 8, "p").logprobs == 5
    assert sampling_params(completion(), 1, 8, "p").logprobs is None


def test_max_tokens_precedence_and_limits() -> None:
    assert sampling_params(chat(max_tokens=3, max_completion_tokens=4), 4, 8, "m").max_tokens == 4
    assert sampling_params(chat(max_tokens=4), 4, 8, "m").max_tokens == 4  # exactly fits
    with pytest.raises(OpenAIError) as e:
        sampling_params(chat(max_tokens=5), 4, 8, "m")
    assert e.value.param == "max_tokens"
    with pytest.raises(OpenAIError) as e:
        sampling_params(completion(), 8, 8, "prompt[2]")
    assert e.value.param == "prompt[2]"


def test_sampling_params_errors_name_the_request_field() -> None:
    cases = [
        (chat(max_completion_tokens=0), "max_completion_tokens"),
        (completion(max_tokens=0), "max_tokens"),
        (chat(temperature=float("nan")), "temperature"),
        (completion(top_k=-5), "top_k"),
        (completion(seed=2**64), "seed"),
    ]
    for req, param in cases:
        with pytest.raises(OpenAIError) as e:
            sampling_params(req, 1, 64, "p")
        assert (e.value.status, e.value.param) == (400, param)
        assert e.value.message.startswith(param)


def test_choice_seeds() -> None:
    base = SamplingParams(seed=2**64 - 1)
    assert [p.seed for p in choice_params(base, 3)] == [2**64 - 1, 0, 1]
    assert choice_params(SamplingParams(), 2) == [SamplingParams()] * 2


def test_chat_prompt_uses_the_template_and_its_kwargs() -> None:
    prompt = chat_prompt(TOK, chat())
    assert prompt.text == "<|begin_of_sentence|>User: hi\nAssistant: "
    assert prompt.token_ids == [3] + ids("User: hi\nAssistant: ")
    no_gen = chat(chat_template_kwargs={"add_generation_prompt": False})
    assert chat_prompt(TOK, no_gen).text == "<|begin_of_sentence|>User: hi\n"


def test_completion_prompts() -> None:
    assert [p.token_ids for p in completion_prompts(TOK, completion())] == [ids("hi")]
    assert completion_prompts(TOK, completion(prompt=[20, 21]))[0].text is None
    many = completion_prompts(TOK, completion(prompt=["a", "bc"]))
    assert [(p.token_ids, p.text) for p in many] == [(ids("a"), "a"), (ids("bc"), "bc")]
    assert [p.token_ids for p in completion_prompts(TOK, completion(prompt=[[9], [10]]))] == [
        [9],
        [10],
    ]
