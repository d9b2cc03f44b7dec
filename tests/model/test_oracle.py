"""Our NumPy engine against transformers' Ernie4_5_MoeForCausalLM on the same files (fp32, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Ernie4_5_MoeForCausalLM

from pdserve.engine.model_runner import SeqChunk
from tests.conftest import CONFIGS, assert_close, make_checkpoint, make_runner, prefill_logits


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=False)
    return out.logits[0].float().numpy()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, checkpoints):
    path = make_checkpoint(checkpoints, request.param)
    hf = Ernie4_5_MoeForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, hf


def random_prompts(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, n).tolist() for n in lengths]


def test_batched_prefill_matches_transformers(pair):
    path, hf = pair
    runner = make_runner(path, num_blocks=32, block_size=16)
    prompts = random_prompts(hf.config.vocab_size, [5, 17, 40, 1, 16], seed=1)
    tables, nxt = [], 0
    for p in prompts:  # disjoint blocks per sequence
        n = -(-len(p) // 16)
        tables.append(list(range(nxt, nxt + n)))
        nxt += n
    for ours, p in zip(prefill_logits(runner, prompts, tables), prompts):
        assert_close(ours, hf_logits(hf, p))


def test_paged_decode_32_steps_matches_transformers(pair):
    """Prefill three prompts, then greedy-decode them together for 32 steps over paged KV."""
    path, hf = pair
    bs = 16
    runner = make_runner(path, num_blocks=24, block_size=bs)
    seqs = random_prompts(hf.config.vocab_size, [3, 14, 30], seed=2)
    # interleaved, non-contiguous block ids: sequence s owns blocks s, s+3, s+6, ...
    tables = [list(range(s, 24, 3)) for s in range(len(seqs))]
    step_logits: list[list[np.ndarray]] = [[] for _ in seqs]
    logits = runner.execute([SeqChunk(p, 0, len(p), t) for p, t in zip(seqs, tables)])
    for step in range(33):
        for s, row in enumerate(logits):
            step_logits[s].append(row)
            seqs[s].append(int(np.argmax(row)))
        if step == 32:
            break
        chunks = [SeqChunk(q, len(q) - 1, 1, t) for q, t in zip(seqs, tables)]
        logits = runner.execute(chunks)
    for s, seq in enumerate(seqs):
        prompt_len = len(seq) - 33
        ref = hf_logits(hf, seq[:-1])[prompt_len - 1 :]  # [33, V], one row per sampled token
        assert_close(np.stack(step_logits[s]), ref)
        # greedy tokens identical: transformers' argmax at each step is the token we chose
        assert np.argmax(ref, axis=-1).tolist() == seq[prompt_len:]


def test_chunked_prefill_resuming_from_cached_blocks(pair):
    """A prompt prefilled in chunks of 7 (each resuming from cached KV) gives the same logits."""
    path, hf = pair
    runner = make_runner(path, num_blocks=8, block_size=4)
    prompt = random_prompts(hf.config.vocab_size, [30], seed=3)[0]
    table = list(range(8))[::-1]
    rows = []
    for start in range(0, len(prompt), 7):
        n = min(7, len(prompt) - start)
        rows.append(runner.execute([SeqChunk(prompt, start, n, table, all_logits=True)]))
    assert_close(np.concatenate(rows), hf_logits(hf, prompt))


def test_paddle_layout_gives_same_logits(checkpoints):
    for name in sorted(CONFIGS):
        pt = make_runner(make_checkpoint(checkpoints, name, "pt", seed=7))
        pd = make_runner(make_checkpoint(checkpoints, name, "paddle", seed=7))
        prompts = random_prompts(CONFIGS[name]["vocab_size"], [9, 21], seed=4)
        tables = [[0, 1], [2, 3]]
        for a, b in zip(prefill_logits(pt, prompts, tables), prefill_logits(pd, prompts, tables)):
            np.testing.assert_array_equal(a, b)
