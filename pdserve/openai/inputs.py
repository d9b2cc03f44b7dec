"""A validated request turned into what the engine takes: prompt token ids and SamplingParams."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pdserve.engine.sampling_params import SamplingParams
from pdserve.openai.errors import bad_request, not_supported
from pdserve.openai.protocol import ChatCompletionRequest, CompletionRequest
from pdserve.tokenizer import Tokenizer

AnyRequest = ChatCompletionRequest | CompletionRequest

# Request fields passed to SamplingParams unchanged when the client sets them.
_SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "min_tokens",
    "ignore_eos",
)


@dataclass(frozen=True)
class Prompt:
    """One prompt to generate from: its token ids, and its text where the client sent text."""

    token_ids: list[int]
    text: str | None = None


def check_supported(req: AnyRequest) -> None:
    """400 for known OpenAI features pdserve does not implement, when asked for."""
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")
    if any(s == "" for s in req.stop_strings):
        raise bad_request("stop strings must not be empty", "stop")
    if req.logit_bias:
        raise not_supported("logit_bias")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise not_supported("response_format", 'response_format other than {"type": "text"}')
    if isinstance(req, ChatCompletionRequest):
        if req.top_logprobs and not req.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
        for name in ("tools", "functions"):
            if getattr(req, name):
                raise not_supported(name, "tool calling")
        if req.tool_choice not in (None, "none", "auto"):
            raise not_supported("tool_choice", "tool calling")
    else:
        if req.echo and req.logprobs is not None:
            raise not_supported("echo", "echo together with logprobs")
        if req.suffix:
            raise not_supported("suffix")
        if req.best_of is not None and req.best_of != req.num_choices:
            raise not_supported("best_of", "best_of other than n")


def chat_prompt(tokenizer: Tokenizer, req: ChatCompletionRequest) -> Prompt:
    """Render the conversation with the model's chat template and tokenize it."""
    kwargs = dict(req.chat_template_kwargs or {})
    add_generation_prompt = kwargs.pop("add_generation_prompt", True)
    if "messages" in kwargs:
        raise bad_request("chat_template_kwargs must not set messages", "chat_template_kwargs")
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    try:
        text = tokenizer.apply_chat_template(messages, bool(add_generation_prompt), **kwargs)
    except ValueError as e:
        raise bad_request(str(e), "messages") from e
    # The template writes bos itself, so encode adds nothing.
    return Prompt(tokenizer.encode(text, add_special_tokens=False), text)


def completion_prompts(tokenizer: Tokenizer, req: CompletionRequest) -> list[Prompt]:
    """The prompts of a completions request: one per string or token id list."""
    raw = req.prompt
    if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
        raw = [raw]
    prompts = []
    for i, p in enumerate(raw):
        param = "prompt" if len(raw) == 1 else f"prompt[{i}]"
        if isinstance(p, str):
            prompt = Prompt(tokenizer.encode(p, add_special_tokens=True), p)
        else:
            bad = [t for t in p if not 0 <= t < tokenizer.vocab_size]
            if bad:
                raise bad_request(
                    f"token id {bad[0]} is outside the vocabulary (0..{tokenizer.vocab_size - 1})",
                    param,
                )
            prompt = Prompt(list(p))
        if not prompt.token_ids:
            raise bad_request("prompt must not be empty", param)
        prompts.append(prompt)
    return prompts


def sampling_params(
    req: AnyRequest, prompt_len: int, max_model_len: int, prompt_param: str
) -> SamplingParams:
    """SamplingParams for one prompt of `req`; max_tokens defaults to the rest of the context.

    Raises a 400 naming the request field SamplingParams rejected, or the prompt / max_tokens
    field when they do not fit in `max_model_len` tokens together.
    """
    if prompt_len >= max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens, but the prompt "
            f"has {prompt_len} tokens, leaving no room for a completion.",
            prompt_param,
        )
    field = req.max_tokens_field
    max_tokens = req.requested_max_tokens
    if max_tokens is None:
        max_tokens = max_model_len - prompt_len
    elif prompt_len + max_tokens > max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, "
            f"{max_tokens} for the completion). Reduce the prompt or {field}.",
            field,
        )
    kwargs = {f: getattr(req, f) for f in _SAMPLING_FIELDS if getattr(req, f) is not None}
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            logprobs=req.num_logprobs,
            stop_token_ids=list(req.stop_token_ids or []),
            **kwargs,
        )
    except ValueError as e:
        name, _, rest = str(e).partition(" ")
        logprobs_field = "top_logprobs" if isinstance(req, ChatCompletionRequest) else "logprobs"
        param = {"max_tokens": field, "logprobs": logprobs_field}.get(name, name)
        raise bad_request(f"{param} {rest}", param) from e


def choice_params(base: SamplingParams, n: int) -> list[SamplingParams]:
    """Params of a prompt's n choices: choice j samples with seed + j when a seed is given."""
    if base.seed is None:
        return [base] * n
    return [dataclasses.replace(base, seed=(base.seed + j) % 2**64) for j in range(n)]
