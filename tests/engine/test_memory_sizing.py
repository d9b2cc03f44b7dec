"""GPU KV pool sizing as arithmetic: memory x utilization minus what the model needs, in blocks,
refused with a message naming the flags when one --max-model-len sequence does not fit."""

from __future__ import annotations

import numpy as np
import pytest

from pdserve.engine.memory_sizing import GiB, plan_kv_blocks, profile_batch

G = 1 << 30
# ERNIE-4.5-21B-A3B on an H200: 28 layers x K,V x 4 KV heads x 128 x bf16 x 64 tokens
BLOCK = 28 * 2 * 4 * 128 * 2 * 64


def plan(**kw):
    args = dict(total_bytes=140 * G, utilization=0.9, weights_bytes=44 * G,
                activation_bytes=3 * G, other_bytes=1 * G, block_bytes=BLOCK, block_size=64,
                max_model_len=32768)  # fmt: skip
    return plan_kv_blocks(**{**args, **kw})


def test_blocks_are_what_is_left_of_the_budget():
    p = plan()
    left = int(140 * G * 0.9) - 48 * G
    assert p.num_blocks == left // BLOCK == 22820
    assert p.kv_bytes <= left < p.kv_bytes + BLOCK
    assert p.max_concurrent_seqs == p.num_blocks // 512  # 32768 tokens are 512 blocks
    text = p.describe()
    for part in ("weights 44.00 GiB", "activations 3.00 GiB", "other 1.00 GiB",
                 f"{p.num_blocks} blocks of 64 tokens", "44 sequences of --max-model-len 32768",
                 f"KV cache {p.kv_bytes / GiB:.2f} GiB"):  # fmt: skip
        assert part in text, (part, text)


@pytest.mark.parametrize("utilization", [0.5, 0.7, 0.9, 1.0])
def test_more_utilization_more_blocks_never_past_the_budget(utilization):
    p, q = plan(utilization=utilization - 0.1), plan(utilization=utilization)
    assert q.num_blocks > p.num_blocks
    assert q.kv_bytes + 48 * G <= 140 * G * utilization


def test_too_little_for_one_sequence_names_the_flags():
    with pytest.raises(ValueError) as e:
        plan(utilization=0.3)  # 42 GiB: less than the weights alone
    msg = str(e.value)
    assert "--gpu-memory-utilization 0.3" in msg and "--max-model-len 32768" in msg
    assert "--num-gpu-blocks-override" in msg and "0 KV blocks" in msg
    # just one block short of one sequence
    budget_for = (48 * G + 511 * BLOCK) / (140 * G)
    with pytest.raises(ValueError, match="511 KV blocks, but one --max-model-len 32768 sequence "
                                         "needs 512"):  # fmt: skip
        plan(utilization=budget_for + 1e-12)
    assert plan(utilization=(48 * G + 512 * BLOCK) / (140 * G) + 1e-12).num_blocks == 512


def test_what_other_processes_hold_is_refused_not_overcommitted():
    p = plan()
    assert plan(free_bytes=p.kv_bytes + 3 * G).num_blocks == p.num_blocks
    with pytest.raises(ValueError, match=r"--gpu-memory-utilization 0.9: .* more than the "
                                         r"50.00 GiB the GPU has free"):  # fmt: skip
        plan(free_bytes=50 * G)


def test_block_size_must_be_positive():
    with pytest.raises(ValueError):
        plan(block_bytes=0)


@pytest.mark.parametrize("tokens,seqs,bs", [(8192, 256, 64), (100, 7, 16), (5, 5, 64)])
def test_profile_batch_is_the_largest_step(tokens, seqs, bs):
    """Every token has a slot of its own in its sequence's blocks; one logits row per sequence."""
    b = profile_batch(tokens, seqs, bs)
    assert b.input_ids.shape == b.positions.shape == b.slot_mapping.shape == (tokens,)
    assert b.query_start_loc_host[-1] == tokens and len(b.seq_lens_host) == seqs
    assert max(b.seq_lens_host) - min(b.seq_lens_host) <= 1
    assert len(set(b.slot_mapping.tolist())) == tokens  # no two tokens share a KV slot
    for s in range(seqs):
        a, e = b.query_start_loc_host[s], b.query_start_loc_host[s + 1]
        pos = b.positions[a:e]
        np.testing.assert_array_equal(pos, np.arange(e - a))
        np.testing.assert_array_equal(b.slot_mapping[a:e],
                                      b.block_tables[s][pos // bs] * bs + pos % bs)  # fmt: skip
    np.testing.assert_array_equal(b.logits_indices, np.asarray(b.query_start_loc_host[1:]) - 1)
