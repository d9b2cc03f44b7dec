"""Offline generation in one process: load a model, run the engine core until prompts finish.

This is what `pdserve generate` runs, and the simplest way to drive the engine from Python.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

from pdserve.backends import get_ops
from pdserve.engine.engine_core import EngineCore, RequestOutput, default_num_blocks
from pdserve.engine.request import Request
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import SchedulerConfig
from pdserve.model.ernie45_moe import load_model
from pdserve.model.tiny import resolve_model_path
from pdserve.tokenizer import Tokenizer, load_tokenizer


class LLM:
    """A model on one backend with its tokenizer and engine core."""

    def __init__(
        self,
        model: str = "tiny",
        backend: str = "auto",
        block_size: int = 64,
        max_model_len: int | None = None,
        num_blocks: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        enable_chunked_prefill: bool = True,
        enable_prefix_caching: bool = True,
        kv_cache_ratio: float = 0.75,
        num_host_blocks: int = 0,
        quantization: str | None = None,
        progress: bool = True,
        graph_sizes: Sequence[int] = (),
    ) -> None:
        if block_size < 1:
            raise ValueError(f"--block-size must be >= 1, got {block_size}")
        self.model_dir = resolve_model_path(model)
        self.ops = get_ops(backend)
        self.model = load_model(self.model_dir, self.ops, progress=progress,
                                quantization=quantization)  # fmt: skip
        self.tokenizer: Tokenizer = load_tokenizer(self.model_dir)
        c = self.model.config
        self.max_model_len = min(max_model_len or c.max_position_embeddings,
                                 c.max_position_embeddings)  # fmt: skip
        if num_blocks is None:
            num_blocks = default_num_blocks(c, block_size, self.max_model_len, max_num_seqs)
        config = SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=self.max_model_len,
            enable_chunked_prefill=enable_chunked_prefill,
            kv_cache_ratio=kv_cache_ratio,
        )
        self.engine = EngineCore(self.model, self.ops, num_blocks, block_size, config,
                                 enable_prefix_caching, num_host_blocks,
                                 graph_sizes=graph_sizes)  # fmt: skip
        self._ids = itertools.count()

    def generate(
        self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]
    ) -> Iterator[list[tuple[int, RequestOutput]]]:
        """Yield, after every step, (prompt index, output) for each request that got a token."""
        if len(prompts) != len(params):
            raise ValueError("one SamplingParams per prompt")
        index = {}
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            req = Request(f"gen-{next(self._ids)}", list(prompt), p, self.tokenizer.eos_token_ids)
            self.engine.add_request(req)
            index[req.request_id] = i
        while any(rid in self.engine.requests for rid in index):
            outs = self.engine.step()
            yield [(index[o.request_id], o) for o in outs if o.request_id in index]

    def generate_all(
        self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]
    ) -> list[list[int]]:
        """The generated token ids of every prompt, once all have finished."""
        tokens: list[list[int]] = [[] for _ in prompts]
        for step in self.generate(prompts, params):
            for i, out in step:
                tokens[i].append(out.token_id)
        return tokens
