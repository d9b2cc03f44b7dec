"""The engine loop: schedule -> execute -> sample -> update, one step at a time."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pdserve.backends import get_ops
from pdserve.backends.base import Ops
from pdserve.config import ModelConfig
from pdserve.engine import memory_sizing
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.model_runner import ModelRunner, SeqChunk
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.sampler import SamplingState, sample
from pdserve.engine.scheduler import Scheduler, SchedulerConfig, StepPlan
from pdserve.engine.tp_group import TPGroup
from pdserve.engine_config import EngineConfig
from pdserve.model.ernie45_moe import ErnieMoeForCausalLM, load_model
from pdserve.model.tiny import resolve_model_path
from pdserve.model.tp_shard import TPLayout

MAX_GRAPH_BATCH = 128  # largest decode batch captured by default
# KV pool size on the NumPy backend when no block count is given (GPU sizing comes from memory).
DEFAULT_KV_CACHE_BYTES = 256 * 1024 * 1024


def _plain_greedy(s: SamplingState) -> bool:
    """Greedy, no penalty, no token banned by min_tokens, no top alternatives asked: the argmax
    of the raw logits is the token."""
    p = s.params
    return (
        p.greedy
        and p.repetition_penalty == 1.0
        and p.presence_penalty == 0.0
        and p.frequency_penalty == 0.0
        and s.num_output_tokens >= p.min_tokens
        and not p.logprobs
    )


def kv_block_bytes(c: ModelConfig, block_size: int) -> int:
    """Bytes of one float32 KV block over all layers."""
    return 4 * block_size * c.num_hidden_layers * 2 * c.kv_size


def default_num_blocks(c: ModelConfig, block_size: int, max_model_len: int, max_seqs: int) -> int:
    """Blocks for max_seqs full-length sequences, capped at DEFAULT_KV_CACHE_BYTES of float32."""
    block_bytes = kv_block_bytes(c, block_size)
    per_seq = -(-max_model_len // block_size)
    return max(1, min(DEFAULT_KV_CACHE_BYTES // block_bytes, max_seqs * per_seq))


@dataclass
class RequestOutput:
    """What one step added to one request."""

    request_id: str
    token_id: int
    logprob: float
    top_logprobs: tuple[np.ndarray, np.ndarray] | None
    finish_reason: str | None  # "stop", "length", "abort" or None while running
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens found in the prefix cache


class StepHooks(Protocol):
    """What the prefill role adds to a step: a per-layer callback and held-back outputs."""

    def layer_hook(self, plan: StepPlan) -> Any: ...  # disagg.LayerPush | None

    def after_step(self, plan: StepPlan, outputs: list[RequestOutput]) -> list[RequestOutput]: ...


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
        num_host_blocks: int = 0,
        kv_cache: Any = None,
        workers: Any = None,
        graph_sizes: Sequence[int] = (),
    ) -> None:
        self.runner = ModelRunner(model, ops, num_blocks, block_size, num_host_blocks, kv_cache,
                                  workers, graph_sizes, scheduler_config.max_model_len)  # fmt: skip
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching, num_host_blocks)
        self.scheduler = Scheduler(scheduler_config, self.blocks)
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        # disaggregation: the prefill role's KV pusher (layer hook, held-back outputs)
        self.pusher: StepHooks | None = None
        self.remote_admitted: list[Request] = []  # decode role: blocks held, awaiting KV

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
        self.remote_admitted.extend(plan.remote_admitted)
        self.runner.copy_blocks(plan.copies)
        if not plan:
            return []
        chunks = [
            SeqChunk(r.token_ids, r.num_computed_tokens, n, r.block_ids)
            for r, n in zip(plan.requests, plan.num_new_tokens)
        ]
        hook = self.pusher.layer_hook(plan) if self.pusher else None
        jobs = hook.jobs if hook is not None else []
        logits = self.runner.execute_device(chunks, hook, jobs)  # [S, V]: each chunk's last token
        ready = []  # rows whose chunk reaches the end of the request's tokens: sample those
        for i, (req, n) in enumerate(zip(plan.requests, plan.num_new_tokens)):
            req.num_computed_tokens += n
            self.blocks.cache_blocks(req)
            if req.num_computed_tokens == req.num_tokens:
                ready.append(i)
        outputs = []
        if ready:
            rows = logits if len(ready) == len(chunks) else logits[ready]
            token_ids, logprobs, tops = self.sample(rows, [plan.requests[i] for i in ready])
            for j, i in enumerate(ready):
                outputs.append(self.accept_token(plan.requests[i], int(token_ids[j]),
                                                 float(logprobs[j]), tops[j]))  # fmt: skip
        if self.pusher is not None:
            outputs = self.pusher.after_step(plan, outputs)
        return outputs

    def sample(self, logits: Any, reqs: list[Request]) -> tuple[np.ndarray, np.ndarray, list]:
        """(token ids, their logprobs, top alternatives) for the device logits [B, V] of reqs.
        When every request is plain greedy the backend may pick on the device and move only
        ids and logprobs; otherwise the logits come to the host for the full sampler."""
        states = [r.sampling for r in reqs]
        if all(_plain_greedy(s) for s in states):
            picked = self.runner.ops.greedy_sample(logits)
            if picked is not None:
                for s in states:  # one draw per step, as `sample` does
                    s.generator.random()
                return picked[0], picked[1], [None] * len(states)
        host = self.runner.ops.to_host(logits).astype(np.float32, copy=False)
        sampled = sample(host, states)
        return sampled.token_ids, sampled.logprobs, sampled.top_logprobs

    def accept_token(
        self, req: Request, token: int, logprob: float, top: tuple[np.ndarray, np.ndarray] | None
    ) -> RequestOutput:
        """Append a sampled token to a request, finishing it if the token ends it."""
        req.append_token(token)
        status = req.check_stop(self.scheduler.config.max_model_len)
        if status is not None:
            self.scheduler.finish(req, status)
            del self.requests[req.request_id]
        return RequestOutput(
            req.request_id, token, logprob, top,
            status.finish_reason if status is not None else None,
            req.num_prompt_tokens, req.num_cached_tokens,
        )  # fmt: skip


def kv_sizing(config: EngineConfig) -> tuple[Path, ModelConfig, int, int]:
    """The model's path and config, and the device and host KV blocks of every rank: what
    rank 0 decides before its workers start (a GPU pool is resized from memory once the model
    is loaded: memory_sizing). ValueError naming the flag on a bad value."""
    path = resolve_model_path(config.model)
    c = ModelConfig.from_hf(path)
    if config.max_model_len > c.max_position_embeddings:
        raise ValueError(f"--max-model-len {config.max_model_len} exceeds the model's "
                         f"max_position_embeddings ({c.max_position_embeddings})")  # fmt: skip
    TPLayout.of(c, 0, config.tensor_parallel_size)  # refuses a size the model cannot split
    num_blocks = config.num_gpu_blocks_override or default_num_blocks(
        c, config.block_size, config.max_model_len, config.max_num_seqs
    )
    num_host_blocks = int(config.swap_space * 2**30) // kv_block_bytes(c, config.block_size)
    return path, c, num_blocks, num_host_blocks


def build_engine_core(
    config: EngineConfig,
    kv_pool: Callable[[tuple[int, ...]], Any] | None = None,
    tp: TPGroup | None = None,
    workers: Any = None,
) -> EngineCore:
    """Load the model of a node's EngineConfig (rank tp.rank's shard) and size its KV pool;
    `kv_pool(shape)` may provide the pool's memory (shared memory on a decode node);
    `workers` are ranks 1.. of a tensor-parallel node (engine/workers.py)."""
    ops = get_ops(config.backend, config.tensor_parallel_size)
    if config.tensor_parallel_size > 1 and ops.name != "numpy":
        raise ValueError(
            f"--tensor-parallel-size {config.tensor_parallel_size}: the {ops.name} backend "
            "has no all-reduce between GPUs yet; use --backend numpy"
        )
    quant = None if config.quantization in (None, "none") else config.quantization
    path, c, num_blocks, num_host_blocks = kv_sizing(config)
    before_load = memory_sizing.snapshot(ops)  # None on the NumPy backend
    model = load_model(path, ops, progress=False, quantization=quant, tp=tp)
    if before_load is not None:  # a GPU pool is sized from the memory the model leaves
        num_blocks = memory_sizing.gpu_kv_blocks(config, model, ops, before_load)
    sched = SchedulerConfig(
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.batched_tokens,
        max_model_len=config.max_model_len,
        enable_chunked_prefill=config.enable_chunked_prefill,
        kv_cache_ratio=config.kv_cache_ratio,
    )
    pool = kv_pool(model.kv_cache_shape(num_blocks, config.block_size)) if kv_pool else None
    return EngineCore(model, ops, num_blocks, config.block_size, sched,
                      config.enable_prefix_caching, num_host_blocks, pool, workers,
                      graph_sizes(config, ops))  # fmt: skip


def graph_sizes(config: EngineConfig, ops: Ops) -> list[int]:
    """The decode batch sizes to capture as CUDA graphs: none on a backend without graphs
    (where asking for them is an error naming the flag)."""
    if ops.name == "numpy":
        if config.use_cudagraph:
            raise ValueError("--use-cudagraph: CUDA graphs need a GPU backend (--backend cupy)")
        return []
    return config.cudagraph_capture_sizes(MAX_GRAPH_BATCH)
