"""Offline generation in one process: load a model, prefill a batch of prompts, decode, stream.

This is what `pdserve generate` runs. It gives each sequence all the KV blocks it can need up
front; the serving engine's scheduler and block manager replace that with paging on demand.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from pdserve.backends import get_ops
from pdserve.engine.model_runner import ModelRunner, SeqChunk
from pdserve.engine.sampler import SamplingState, sample
from pdserve.engine.sampling_params import SamplingParams
from pdserve.model.ernie45_moe import load_model
from pdserve.model.tiny import resolve_model_path
from pdserve.tokenizer import Tokenizer, load_tokenizer


@dataclass
class TokenOutput:
    """One new token of sequence `index`."""

    index: int
    token_id: int
    logprob: float
    finish_reason: str | None  # "stop" (eos or a stop token), "length" (max_tokens), or None


@dataclass
class _Sequence:
    index: int
    token_ids: list[int]
    prompt_len: int
    state: SamplingState
    blocks: list[int]
    num_computed: int = 0
    finished: bool = False

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.prompt_len


class LLM:
    """A model on one backend with its tokenizer, generating for batches of prompts."""

    def __init__(
        self,
        model: str = "tiny",
        backend: str = "auto",
        block_size: int = 64,
        max_model_len: int | None = None,
        progress: bool = True,
    ) -> None:
        self.model_dir = resolve_model_path(model)
        self.ops = get_ops(backend)
        self.model = load_model(self.model_dir, self.ops, progress=progress)
        self.tokenizer: Tokenizer = load_tokenizer(self.model_dir)
        self.config = self.model.config
        limit = self.config.max_position_embeddings
        self.max_model_len = min(max_model_len or limit, limit)
        self.block_size = block_size

    def generate(
        self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]
    ) -> Iterator[list[TokenOutput]]:
        """Yield, after every step, the new token of each unfinished sequence."""
        if len(prompts) != len(params):
            raise ValueError("one SamplingParams per prompt")
        seqs: list[_Sequence] = []
        next_block = 0
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            if not prompt:
                raise ValueError(f"prompt {i} is empty")
            if len(prompt) + p.max_tokens > self.max_model_len:
                raise ValueError(
                    f"prompt {i}: {len(prompt)} tokens + max_tokens {p.max_tokens} exceed "
                    f"max_model_len {self.max_model_len}"
                )
            n = -(-(len(prompt) + p.max_tokens) // self.block_size)
            state = SamplingState.create(p, prompt, self.tokenizer.eos_token_ids)
            blocks = list(range(next_block, next_block + n))
            seqs.append(_Sequence(i, list(prompt), len(prompt), state, blocks))
            next_block += n
        runner = ModelRunner(self.model, self.ops, next_block, self.block_size)
        while True:
            live = [s for s in seqs if not s.finished]
            if not live:
                return
            chunks = [
                SeqChunk(s.token_ids, s.num_computed, len(s.token_ids) - s.num_computed, s.blocks)
                for s in live
            ]
            logits = runner.execute(chunks)
            out = sample(logits, [s.state for s in live])
            step = []
            for s, tok, lp in zip(live, out.token_ids.tolist(), out.logprobs.tolist()):
                s.num_computed = len(s.token_ids)
                s.token_ids.append(tok)
                s.state.append(tok)
                reason = self._finish_reason(s, tok)
                s.finished = reason is not None
                step.append(TokenOutput(s.index, tok, lp, reason))
            yield step

    def _finish_reason(self, seq: _Sequence, token: int) -> str | None:
        p = seq.state.params
        if token in p.stop_token_ids:
            return "stop"
        if not p.ignore_eos and token in self.tokenizer.eos_token_ids:
            return "stop"
        if seq.num_output >= p.max_tokens:
            return "length"
        return None
