"""The engine loop: schedule -> execute -> sample -> update, one step at a time."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pdserve.backends.base import Ops
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.model_runner import ModelRunner, SeqChunk
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.sampler import sample
from pdserve.engine.scheduler import Scheduler, SchedulerConfig
from pdserve.model.ernie45_moe import ErnieMoeForCausalLM


@dataclass
class RequestOutput:
    """What one step added to one request."""

    request_id: str
    token_id: int
    logprob: float
    top_logprobs: tuple[np.ndarray, np.ndarray] | None
    finish_reason: str | None  # "stop", "length", "abort" or None while running


class EngineCore:
    """A model, its KV pool, a block manager and a scheduler, driven one step at a time."""

    def __init__(
        self,
        model: ErnieMoeForCausalLM,
        ops: Ops,
        num_blocks: int,
        block_size: int,
        scheduler_config: SchedulerConfig,
        enable_prefix_caching: bool = True,
    ) -> None:
        self.runner = ModelRunner(model, ops, num_blocks, block_size)
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(scheduler_config, self.blocks)
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        self.scheduler.add(req)
        self.requests[req.request_id] = req

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its blocks; False if it is unknown or already finished."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
        return True

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        self.num_preemptions += len(plan.preempted)
        if not plan:
            return []
        chunks = [
            SeqChunk(r.token_ids, r.num_computed_tokens, n, r.block_ids)
            for r, n in zip(plan.requests, plan.num_new_tokens)
        ]
        logits = self.runner.execute(chunks)  # [S, V], one row per chunk's last token
        ready = []  # rows whose chunk reaches the end of the request's tokens: sample those
        for i, (req, n) in enumerate(zip(plan.requests, plan.num_new_tokens)):
            req.num_computed_tokens += n
            self.blocks.cache_blocks(req)
            if req.num_computed_tokens == req.num_tokens:
                ready.append(i)
        if not ready:
            return []
        sampled = sample(logits[ready], [plan.requests[i].sampling for i in ready])
        outputs = []
        max_len = self.scheduler.config.max_model_len
        for j, i in enumerate(ready):
            req = plan.requests[i]
            token = int(sampled.token_ids[j])
            req.append_token(token)
            status = req.check_stop(max_len)
            if status is not None:
                self.scheduler.finish(req, status)
                del self.requests[req.request_id]
            outputs.append(
                RequestOutput(
                    req.request_id,
                    token,
                    float(sampled.logprobs[j]),
                    sampled.top_logprobs[j],
                    status.finish_reason if status is not None else None,
                )
            )
        return outputs
