"""The one request object of the engine: tokens, progress, status, blocks, sampling state."""

from __future__ import annotations

import time
from enum import IntEnum

from pdserve.engine.sampler import SamplingState
from pdserve.engine.sampling_params import SamplingParams


class RequestStatus(IntEnum):
    WAITING = 0
    WAITING_FOR_REMOTE_KV = 1  # disaggregated decode: blocks held, KV arriving from a prefill node
    RUNNING = 2
    PREEMPTED = 3  # blocks taken back; recomputed from scratch when rescheduled
    FINISHED_STOPPED = 4  # eos or a stop token
    FINISHED_LENGTH = 5  # max_tokens or max_model_len
    FINISHED_ABORTED = 6

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


class Request:
    """A prompt and its generated tokens. `num_computed_tokens` catches up with `num_tokens`:
    prefill chunks and decode steps are the same thing, computing tokens whose KV is missing.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        eos_token_ids: tuple[int, ...] = (),
        arrival_time: float | None = None,
    ) -> None:
        if not prompt_token_ids:
            raise ValueError("prompt is empty")
        self.request_id = request_id
        self.token_ids = list(prompt_token_ids)  # prompt, then outputs
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.eos_token_ids = eos_token_ids
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache on admission
        self.block_ids: list[int] = []
        self.block_hashes: list[bytes] = []  # chained hashes of the full blocks of token_ids
        self.num_registered_blocks = 0  # leading blocks already offered to the prefix cache
        self.sampling = SamplingState.create(params, prompt_token_ids, eos_token_ids)
        # disaggregation: on a decode node, the prompt's KV comes from a prefill node
        self.remote_prefill = False
        self.transfer_id = ""  # the id its KV frames carry
        # on a prefill node: where to push the prompt's KV (a kvtransfer job), else None
        self.kv_push: object | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        self.sampling.append(token_id)

    def check_stop(self, max_model_len: int) -> RequestStatus | None:
        """The finished status the last appended token puts this request in, if any."""
        token = self.token_ids[-1]
        p = self.params
        if self.num_output_tokens >= p.min_tokens and (
            token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids)
        ):
            return RequestStatus.FINISHED_STOPPED
        if self.num_output_tokens >= p.max_tokens or self.num_tokens >= max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
