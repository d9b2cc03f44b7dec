"""One token budget a step: running requests first (decodes and prefill chunks alike), then
new ones, preempting the newest running request by recompute when blocks run out."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pdserve.engine.block_manager import BlockManager
from pdserve.engine.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256  # running requests at most
    max_num_batched_tokens: int = 8192  # tokens computed per step at most
    max_model_len: int = 8192  # prompt + output tokens at most
    enable_chunked_prefill: bool = True
    kv_cache_ratio: float = 0.75  # share of blocks new prefills may fill; the rest is for decodes

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"--max-num-seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError("--max-num-batched-tokens must be >= 1")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                "without chunked prefill, --max-num-batched-tokens "
                f"({self.max_num_batched_tokens}) must be >= --max-model-len ({self.max_model_len})"
            )
        if not 0.0 < self.kv_cache_ratio <= 1.0:
            raise ValueError(f"--kv-cache-ratio must be in (0, 1], got {self.kv_cache_ratio}")


@dataclass
class StepPlan:
    """What one step computes: `num_new_tokens[i]` tokens of `requests[i]`, past its computed
    ones. Plain data: the model runner turns it into arrays."""

    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    # KV block copies between the device pool and the host tier, to run in order before the
    # forward pass: (SWAP_OUT, block, slot) or (SWAP_IN, slot, block)
    copies: list[tuple[int, int, int]] = field(default_factory=list)
    # requests given blocks this step that wait for their prompt's KV from a prefill node
    remote_admitted: list[Request] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.requests)


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.remote: list[Request] = []  # WAITING_FOR_REMOTE_KV: blocks held, nothing to compute

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.remote)

    @property
    def has_compute(self) -> bool:
        """Whether a step would compute anything (remote waits alone need no steps)."""
        return bool(self.running or self.waiting)

    def add(self, req: Request) -> None:
        if req.num_tokens + req.params.max_tokens > self.config.max_model_len:
            raise ValueError(
                f"prompt ({req.num_tokens} tokens) plus max_tokens ({req.params.max_tokens}) "
                f"exceeds max_model_len ({self.config.max_model_len})"
            )
        # the last sampled token's KV is never computed
        need = self.blocks.blocks_needed(req.num_tokens + req.params.max_tokens - 1)
        if need > self.blocks.num_blocks:
            raise ValueError(
                f"prompt ({req.num_tokens} tokens) plus max_tokens ({req.params.max_tokens}) "
                f"needs {need} KV blocks but the pool has {self.blocks.num_blocks}"
            )
        self.waiting.append(req)

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.config.max_num_batched_tokens
        for req in list(self.running):
            if budget == 0:
                break
            if req.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.blocks.grow(req, n):
                victim = self.running[-1]  # the newest
                self._preempt(victim, plan)
                if victim is req:
                    break
            if req.status != RequestStatus.RUNNING:
                continue
            plan.requests.append(req)
            plan.num_new_tokens.append(n)
            budget -= n
        if not plan.preempted:
            self._admit_waiting(plan, budget)
        plan.copies = self.blocks.take_copies()
        return plan

    def _admit_waiting(self, plan: StepPlan, budget: int) -> None:
        # rounded first so that 10 blocks at 0.8 reserve 2, not int(1.9999999999999996)
        reserve = int(round(self.blocks.num_blocks * (1.0 - self.config.kv_cache_ratio), 9))
        while self.waiting and len(self.running) + len(self.remote) < self.config.max_num_seqs:
            req = self.waiting[0]
            prefix = self.blocks.match_prefix(req)
            host_hits = self.blocks.match_host(req, len(prefix))
            n = req.num_tokens - (len(prefix) + len(host_hits)) * self.blocks.block_size
            if req.remote_prefill:  # blocks for the whole prompt, no compute: no budget needed
                if not self.blocks.admit(req, prefix, n, reserve, host_hits):
                    break
                self.waiting.popleft()
                req.status = RequestStatus.WAITING_FOR_REMOTE_KV
                self.remote.append(req)
                plan.remote_admitted.append(req)
                continue
            if budget == 0:
                break
            if n > budget and not self.config.enable_chunked_prefill:
                break
            n = min(n, budget)
            # nothing running means nothing can free blocks later: then the reserve is lent out
            if not self.blocks.admit(req, prefix, n, reserve if self.running else 0, host_hits):
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            plan.requests.append(req)
            plan.num_new_tokens.append(n)
            budget -= n

    def _preempt(self, req: Request, plan: StepPlan) -> None:
        self.running.remove(req)
        self.blocks.release(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(req)
        plan.preempted.append(req)

    def activate_remote(self, req: Request, num_valid_tokens: int) -> None:
        """A remote-prefilled request whose KV landed (num_valid_tokens = its prompt), or whose
        prefill failed and is recomputed here from its valid prefix: run it from now on."""
        self.remote.remove(req)
        req.remote_prefill = False
        req.num_computed_tokens = num_valid_tokens
        req.status = RequestStatus.RUNNING
        self.running.append(req)

    def finish(self, req: Request, status: RequestStatus) -> None:
        """End a request (stopped, length or aborted) wherever it is and free its blocks."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.remote:
            self.remote.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.blocks.release(req)
        req.status = status
