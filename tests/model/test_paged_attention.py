"""Paged KV: any block size, any block placement, any batch mix gives one sequence's logits."""

from __future__ import annotations

import numpy as np
import pytest

from pdserve.engine.model_runner import SeqChunk
from tests.conftest import assert_close, make_checkpoint, make_runner, prefill_logits


@pytest.fixture(scope="module")
def model_dir(checkpoints):
    return make_checkpoint(checkpoints, "gqa_moe", seed=11)


def alone(model_dir, prompt: list[int]) -> np.ndarray:
    """The reference: one sequence, one block holding all of it, contiguous KV."""
    runner = make_runner(model_dir, num_blocks=1, block_size=128)
    return prefill_logits(runner, [prompt], [[0]])[0]


@pytest.mark.parametrize("block_size", [1, 16, 64])
def test_mixed_batch_over_scattered_blocks_matches_sequence_alone(model_dir, block_size):
    rng = np.random.default_rng(block_size)
    # lengths straddling block boundaries for every block size under test
    lengths = [1, 15, 16, 17, 63, 65, 100]
    prompts = [rng.integers(3, 300, n).tolist() for n in lengths]
    need = [-(-n // block_size) for n in lengths]
    ids = rng.permutation(sum(need)).tolist()  # blocks handed out in random order
    tables = []
    for n in need:
        tables.append(ids[:n])
        ids = ids[n:]
    runner = make_runner(model_dir, num_blocks=sum(need), block_size=block_size)
    for got, p in zip(prefill_logits(runner, prompts, tables), prompts):
        assert_close(got, alone(model_dir, p), rtol=1e-5)


def test_decode_batch_mixed_with_prefill_chunk_matches_alone(model_dir):
    """A decode step and a prefill chunk that resumes from cached blocks share one pass."""
    bs = 16
    runner = make_runner(model_dir, num_blocks=16, block_size=bs)
    rng = np.random.default_rng(5)
    a = rng.integers(3, 300, 20).tolist()
    b = rng.integers(3, 300, 50).tolist()
    ta, tb = [9, 3], [0, 7, 12, 5]
    runner.execute([SeqChunk(a, 0, 19, ta), SeqChunk(b, 0, 21, tb)])
    # a decodes its last token while b prefills 29 more tokens from position 21
    logits = runner.execute([SeqChunk(a, 19, 1, ta), SeqChunk(b, 21, 29, tb, all_logits=True)])
    assert_close(logits[0], alone(model_dir, a)[-1], rtol=1e-5)
    assert_close(logits[1:], alone(model_dir, b)[21:], rtol=1e-5)


def test_block_table_too_short_is_an_error(model_dir):
    runner = make_runner(model_dir, num_blocks=4, block_size=4)
    with pytest.raises(ValueError, match="need 3 blocks"):
        runner.execute([SeqChunk(list(range(3, 13)), 0, 10, [0, 1])])
