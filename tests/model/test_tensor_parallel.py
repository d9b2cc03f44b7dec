"""Tensor-parallel shards: the ranks together compute what the whole model computes.

Ranks run as threads here, each with its own ZeroMQ group, exactly as the worker processes use
them; tests/integration runs real worker processes.
"""

from __future__ import annotations

import os
import threading
import uuid

import numpy as np
import pytest

from pdserve.backends.numpy_ops import NumpyOps
from pdserve.config import ModelConfig
from pdserve.engine.model_runner import ModelRunner, SeqChunk
from pdserve.engine.tp_group import ZmqGroup
from pdserve.model.ernie45_moe import load_model
from pdserve.model.tp_shard import TPLayout
from tests.conftest import assert_close, full_config, make_checkpoint

PROMPTS = [list(range(5, 62)), [7, 3, 9] * 11, list(range(100, 117))]
TABLES = [[0, 1, 2, 3], [4, 5, 6], [7, 8]]


def run_ranks(path, size: int, quant: str | None, steps: int = 0) -> tuple[np.ndarray, list]:
    """Prefill logits of PROMPTS at TP `size` (rank 0's), then `steps` greedy decode steps."""
    base = os.path.join(os.environ["PDSERVE_IPC_DIR"], f"tp-{uuid.uuid4().hex[:8]}")
    results: dict[int, object] = {}

    def rank(r: int) -> None:
        group = ZmqGroup(r, size, lambda i: f"ipc://{base}-{i}", timeout_s=30)
        try:
            ops = NumpyOps()
            runner = ModelRunner(load_model(path, ops, False, quant, group), ops, 16, 16)
            chunks = [SeqChunk(p, 0, len(p), t, all_logits=True) for p, t in zip(PROMPTS, TABLES)]
            logits = runner.execute(chunks)
            seqs = [list(p) for p in PROMPTS]
            tokens = []
            ends = np.cumsum([len(p) for p in PROMPTS]) - 1
            last = None if logits is None else logits[ends]
            for _ in range(steps):  # rank 0 picks; the others follow through a broadcast
                if tokens:
                    chunks = [SeqChunk(s, len(s) - 1, 1, t) for s, t in zip(seqs, TABLES)]
                    last = runner.execute(chunks)
                mine = np.zeros(len(seqs), np.int64) if last is None else last.argmax(-1)
                picked = group.all_reduce(mine.astype(np.int64))
                tokens.append(picked.tolist())
                for s, t in zip(seqs, picked):
                    s.append(int(t))
            results[r] = (logits, tokens)
        except BaseException as e:  # surfaced by the main thread
            results[r] = e
        finally:
            group.close()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for r in reversed(range(size)):  # a worker's error first: rank 0 then times out waiting
        if isinstance(results.get(r), BaseException):
            raise results[r]
    assert len(results) == size, "a rank did not finish"
    assert all(results[r][0] is None for r in range(1, size)), "only rank 0 gathers logits"
    return results[0]


@pytest.mark.parametrize("quant", [None, "wint8", "wint4", "block_wise_fp8"])
@pytest.mark.parametrize("size", [2, 4])
def test_ranks_together_compute_the_whole_models_logits(checkpoints, size, quant):
    path = make_checkpoint(checkpoints, "gqa_moe", seed=3)  # 2 KV heads: TP 4 replicates them
    ref, ref_tokens = run_ranks(path, 1, quant, steps=6)
    ours, tokens = run_ranks(path, size, quant, steps=6)
    assert ours.shape == ref.shape == (sum(map(len, PROMPTS)), 300)
    assert_close(ours, ref, rtol=1e-5)
    assert tokens == ref_tokens  # greedy decoding over the paged KV shards


def test_untied_head_and_a_single_kv_head(checkpoints):
    path = make_checkpoint(checkpoints, "interval_untied", seed=4)  # 6 heads, 1 KV head
    ref, _ = run_ranks(path, 1, None)
    ours, _ = run_ranks(path, 2, None)
    assert_close(ours, ref, rtol=1e-5)


def test_layout_of_each_rank():
    c = ModelConfig.from_dict(full_config("gqa_moe"))  # 4 heads, 2 KV heads, vocab 300
    four = [TPLayout.of(c, r, 4) for r in range(4)]
    assert [x.first_head for x in four] == [0, 1, 2, 3]
    assert [x.first_kv_head for x in four] == [0, 0, 1, 1]  # query heads 0,1 read KV head 0
    assert [(x.vocab_start, x.vocab_end) for x in four] == [(0, 75), (75, 150), (150, 225),
                                                           (225, 300)]  # fmt: skip
    two = [TPLayout.of(c, r, 2) for r in range(2)]
    assert [(x.heads, x.kv_heads, x.first_kv_head) for x in two] == [(2, 1, 0), (2, 1, 1)]


@pytest.mark.parametrize("size", [3, 8])
def test_sizes_the_model_cannot_split_name_the_flag(size):
    c = ModelConfig.from_dict(full_config("gqa_moe"))
    with pytest.raises(ValueError, match=f"--tensor-parallel-size {size}"):
        TPLayout.of(c, 0, size)
