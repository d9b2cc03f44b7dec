"""The OpenAI API's logic, free of any HTTP framework: bodies in, JSON dicts or SSE lines out.

A request is validated and tokenized, fanned out as one engine request per choice
(`<response id>-<choice index>`), and the choices' deltas are detokenized, cut at stop strings
and rendered. Errors before any output raise `OpenAIError`; a stream that fails later ends with
an error event. However a request ends (finished, stop string, client gone, error), every engine
request it started is closed, which aborts those still running.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from pdserve.engine.sampling_params import SamplingParams
from pdserve.openai.choice import ChoiceState, ChoiceUpdate
from pdserve.openai.engine_protocol import (
    EngineClient,
    EngineDeadError,
    EngineError,
    RequestRejected,
    TokenDelta,
)
from pdserve.openai.errors import (
    OpenAIError,
    bad_request,
    from_validation_error,
    internal_error,
    model_not_found,
    service_unavailable,
    too_many_requests,
)
from pdserve.openai.fanout import Fanout, aclose_streams
from pdserve.openai.inputs import (
    AnyRequest,
    Prompt,
    chat_prompt,
    check_supported,
    choice_params,
    completion_prompts,
    sampling_params,
)
from pdserve.openai.logprobs import LogprobFormatter
from pdserve.openai.protocol import ChatCompletionRequest, CompletionRequest
from pdserve.openai.render import ChatRenderer, CompletionRenderer, usage
from pdserve.openai.responses import ModelCard, ModelList
from pdserve.openai.sse import DONE, SSEStream, sse_error, sse_event
from pdserve.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

RequestT = TypeVar("RequestT", bound=BaseModel)
Renderer = ChatRenderer | CompletionRenderer


def parse_request(model: type[RequestT], body: Any) -> RequestT:
    """Validate a decoded JSON body; a 400 naming the first bad field otherwise."""
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise from_validation_error(e) from e


def engine_error(exc: EngineError) -> OpenAIError:
    """The HTTP error for an engine failure: 400 for a rejected request, else 503."""
    if isinstance(exc, RequestRejected):
        return bad_request(str(exc))
    return service_unavailable(str(exc) or "the engine is unavailable")


@dataclass
class _Job:
    """One request in flight: its choices, their engine streams and how they are rendered."""

    req: AnyRequest
    prompts: list[Prompt]
    states: list[ChoiceState]
    fanout: Fanout
    renderer: Renderer


class OpenAIServing:
    """Handlers for /v1/chat/completions, /v1/completions and /v1/models.

    `chat` and `completions` take the decoded JSON body and return a response dict, or for
    `stream: true` an `SSEStream` of `data: ...` lines that the caller writes out and must
    `aclose()` if it stops early. They raise `OpenAIError` for anything wrong before output.
    """

    def __init__(
        self,
        engine: EngineClient,
        tokenizer: Tokenizer,
        model_name: str,
        max_model_len: int,
        max_concurrency: int | None = None,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len  # tokens: prompt plus completion
        self.max_concurrency = max_concurrency  # engine requests (choices) in flight
        self.created = int(time.time())
        self._formatter = LogprobFormatter(tokenizer)
        self._num_active = 0  # engine requests this frontend started and has not closed

    def list_models(self) -> dict[str, Any]:
        """The /v1/models body: the one served model."""
        card = ModelCard(
            id=self.model_name,
            created=self.created,
            root=self.model_name,
            max_model_len=self.max_model_len,
        )
        return ModelList(data=[card]).model_dump()

    async def chat(self, body: Any) -> dict[str, Any] | SSEStream:
        """POST /v1/chat/completions."""
        req = parse_request(ChatCompletionRequest, body)
        self._check(req)
        prompt = chat_prompt(self.tokenizer, req)
        return await self._serve(req, [prompt], "chatcmpl", "messages", ChatRenderer)

    async def completions(self, body: Any) -> dict[str, Any] | SSEStream:
        """POST /v1/completions; a list of prompts gives n choices per prompt, in order."""
        req = parse_request(CompletionRequest, body)
        self._check(req)
        prompts = completion_prompts(self.tokenizer, req)
        return await self._serve(req, prompts, "cmpl", "prompt", CompletionRenderer)

    def _check(self, req: AnyRequest) -> None:
        if req.model is not None and req.model != self.model_name:
            raise model_not_found(req.model)
        check_supported(req)

    def _admit(self, num_requests: int) -> None:
        limit = self.max_concurrency
        if limit is None:
            return
        if num_requests > limit:
            raise bad_request(
                f"The request needs {num_requests} concurrent generations but the server runs "
                f"at most {limit}.",
                "n",
            )
        # Requests this frontend started may not have reached the engine's count yet.
        running = max(self.engine.num_running, self._num_active)
        if running + num_requests > limit:
            raise too_many_requests(
                f"The server is at its concurrency limit ({limit} requests); retry later."
            )

    def _release(self, num_requests: int) -> None:
        self._num_active -= num_requests

    async def _serve(
        self,
        req: AnyRequest,
        prompts: list[Prompt],
        id_prefix: str,
        prompt_param: str,
        renderer_cls: type[ChatRenderer] | type[CompletionRenderer],
    ) -> dict[str, Any] | SSEStream:
        n = req.num_choices
        params = []
        for k, prompt in enumerate(prompts):
            param = prompt_param if len(prompts) == 1 else f"{prompt_param}[{k}]"
            base = sampling_params(req, len(prompt.token_ids), self.max_model_len, param)
            params.extend(choice_params(base, n))
        self._admit(len(params))
        response_id = f"{id_prefix}-{uuid.uuid4().hex}"
        echo = isinstance(req, CompletionRequest) and bool(req.echo)
        states = [self._choice(req, i, i // n, prompts[i // n], echo) for i in range(len(params))]
        renderer = renderer_cls(response_id, self.model_name, req, prompts, self._formatter)
        fanout = await self._start(response_id, prompts, n, params)
        job = _Job(req, prompts, states, fanout, renderer)
        if not req.stream:
            try:
                async with aclosing(self._updates(job)) as updates:
                    async for _ in updates:
                        pass
            except EngineError as e:
                raise engine_error(e) from e
            finally:
                await fanout.aclose()
            return renderer.response(states, usage(prompts, states)).model_dump()
        try:
            await fanout.prime()  # so that admission errors still get an HTTP status
        except BaseException as e:
            await fanout.aclose()
            if isinstance(e, EngineError):
                raise engine_error(e) from e
            raise
        return SSEStream(self._stream(job), fanout)

    def _choice(
        self, req: AnyRequest, index: int, prompt_index: int, prompt: Prompt, echo: bool
    ) -> ChoiceState:
        prefix = ""
        if echo:
            prefix = prompt.text
            if prefix is None:
                prefix = self.tokenizer.decode(prompt.token_ids, skip_special_tokens=False)
        return ChoiceState(
            index,
            prompt_index,
            self.tokenizer,
            prompt.token_ids,
            stop=req.stop_strings,
            include_stop_str=bool(req.include_stop_str_in_output),
            skip_special_tokens=req.skip_special_tokens is not False,
            min_tokens=req.min_tokens or 0,
            prefix=prefix,
        )

    async def _start(
        self, response_id: str, prompts: Sequence[Prompt], n: int, params: Sequence[SamplingParams]
    ) -> Fanout:
        streams: list[AsyncIterator[TokenDelta]] = []
        try:
            for i, p in enumerate(params):
                rid = f"{response_id}-{i}"
                streams.append(self.engine.generate(rid, prompts[i // n].token_ids, p))
        except BaseException as e:
            await aclose_streams(streams)
            if isinstance(e, EngineError):
                raise engine_error(e) from e
            raise
        self._num_active += len(streams)
        return Fanout(streams, on_close=lambda: self._release(len(streams)))

    async def _updates(self, job: _Job) -> AsyncGenerator[ChoiceUpdate, None]:
        """Each choice's updates as its deltas arrive; a stop string closes its engine stream."""
        async with aclosing(job.fanout.events()) as events:
            async for i, delta in events:
                state = job.states[i]
                if state.finished:
                    continue
                update = state.update(delta)
                if state.stopped_by_string:
                    await job.fanout.close(i)
                yield update
        unfinished = [s.index for s in job.states if not s.finished]
        if unfinished:
            raise EngineDeadError(f"the engine stopped streaming choices {unfinished} unfinished")

    async def _stream(self, job: _Job) -> AsyncGenerator[str, None]:
        renderer = job.renderer
        try:
            for chunk in renderer.head(job.states):
                yield sse_event(chunk)
            async with aclosing(self._updates(job)) as updates:
                async for update in updates:
                    chunk = renderer.chunk(job.states[update.index], update)
                    if chunk is not None:
                        yield sse_event(chunk)
            if job.req.include_usage:
                yield sse_event(renderer.usage_chunk(usage(job.prompts, job.states)))
        except EngineError as e:
            logger.warning("stream %s failed: %s", renderer.id, e)
            yield sse_error(engine_error(e))
        except Exception:
            logger.exception("stream %s failed", renderer.id)
            yield sse_error(internal_error())
        finally:
            await job.fanout.aclose()
        yield DONE
