"""The attention kernels (csrc/attention.cu for decode rows, csrc/attention_prefill.cu for prefill
chunks) against the NumPy backend's paged_attention: odd lengths, shuffled block tables, several
GQA shapes, mixed batches, poisoned outputs, and decode replayed from a CUDA graph with lengths
that differ from the captured ones."""

from __future__ import annotations

import numpy as np
import pytest

from pdserve.backends import gpu_unavailable_reason
from pdserve.backends.numpy_ops import NumpyOps
from pdserve.model.forward_batch import ForwardBatch
from tests.gpu.bf16_reference import assert_bf16_close, round_bf16

REASON = gpu_unavailable_reason()
if REASON is not None:
    pytest.skip(f"GPU tests need CuPy and a CUDA GPU: {REASON}", allow_module_level=True)
else:
    import cupy as cp

    from pdserve.backends import cupy_attention
    from pdserve.backends.cupy_attention import decode_splits
    from pdserve.backends.cupy_ops import CupyOps

pytestmark = pytest.mark.gpu
ref = NumpyOps()
ERNIE = (20, 4, 128, 64)  # heads, kv_heads, head_dim, block_size


class Case:
    """Sequences (cached, new) over a shuffled pool of random KV, bf16-exact, with queries."""

    def __init__(self, rng, seqs, heads, kv_heads, d, bs, width=None, pad_rows=0, blocks=None):
        self.seqs, self.heads, self.kv_heads, self.d, self.bs = seqs, heads, kv_heads, d, bs
        need = [-(-(c + n) // bs) for c, n in seqs]
        self.width = width or max(need)
        self.num_blocks = blocks or max(sum(need), self.width) + 3
        ids = rng.permutation(self.num_blocks)
        self.tables = np.zeros((len(seqs) + pad_rows, self.width), np.int32)
        for s, n in enumerate(need):
            self.tables[s, :n], ids = ids[:n], ids[n:]
        # padded rows of a graph batch: one token at position 0 of block 0, slot -1
        self.lens = [c + n for c, n in seqs] + [1] * pad_rows
        self.starts = np.cumsum([0] + [n for _, n in seqs] + [1] * pad_rows).tolist()
        t = self.starts[-1]
        self.pool = round_bf16(rng.standard_normal((2, self.num_blocks, bs, kv_heads, d)))
        self.q = round_bf16(rng.standard_normal((t, heads, d)).astype(np.float32))
        self.scale = d**-0.5

    def batch(self, to_device, host: bool = True) -> ForwardBatch:
        t = self.starts[-1]
        return ForwardBatch(
            input_ids=to_device(np.zeros(t, np.int64)),
            positions=to_device(np.zeros(t, np.int64)),
            slot_mapping=to_device(np.full(t, -1, np.int64)),
            query_start_loc=to_device(np.asarray(self.starts, np.int32)),
            seq_lens=to_device(np.asarray(self.lens, np.int32)),
            block_tables=to_device(self.tables),
            logits_indices=to_device(np.asarray(self.starts[1:], np.int64) - 1),
            block_size=self.bs,
            query_start_loc_host=list(self.starts) if host else None,
            seq_lens_host=list(self.lens) if host else None,
        )

    def want(self) -> np.ndarray:
        return ref.paged_attention(self.q, self.pool, self.batch(np.asarray), self.scale)

    def got(self, ops: CupyOps, host: bool = True) -> np.ndarray:
        batch = self.batch(ops.to_device, host)
        out = ops.paged_attention(ops.weight(self.q), ops.weight(self.pool), batch, self.scale)
        return ops.to_host(out)


def test_decode_splits_fill_the_gpu():
    # batch 1, ERNIE's 4 KV heads: a split per 64 keys (a tile for each of 4 warps) at 1k
    # context, and ~2 blocks per SM of an H200 at 4k (or in a CUDA-graph plan, which sees
    # only the table width, max_model_len 4096)
    assert decode_splits(132, 4, 1024) == 16
    assert decode_splits(132, 4, 4096) * 4 >= 256
    assert decode_splits(132, 128 * 4, 1024) == 1
    assert decode_splits(132, 4, 1) == 1


@pytest.mark.parametrize("ctx", [1, 63, 64, 65, 1000, 5000])
def test_decode_one_sequence(ops, rng, ctx):
    case = Case(rng, [(ctx - 1, 1)], *ERNIE)
    assert_bf16_close(case.got(ops), case.want())


DECODE_SHAPES = {  # heads, kv_heads, head_dim, block_size
    "ernie": ERNIE,
    "g8_d64_bs16": (8, 1, 64, 16),
    "mha_d8_bs1": (4, 4, 8, 1),
    "g6_d96_bs8": (12, 2, 96, 8),
    "g12_d128_bs32": (24, 2, 128, 32),  # two blocks per KV head's group
    "g3_d24_bs64": (6, 2, 24, 64),
}


@pytest.mark.parametrize("shape", list(DECODE_SHAPES))
def test_decode_batch(ops, rng, shape):
    seqs = [(c - 1, 1) for c in (1, 63, 64, 65, 1000, 5000, 300)]
    case = Case(rng, seqs, *DECODE_SHAPES[shape])
    want = case.want()
    assert_bf16_close(case.got(ops), want)
    assert_bf16_close(case.got(ops, host=False), want)  # the plan from shapes alone


PREFILL_CASES = {  # sequences (cached, new), heads, kv_heads, head_dim, block_size
    "no_prefix": ([(0, 333)], *ERNIE),
    "cached_prefix": ([(777, 250)], *ERNIE),
    "long_chunk": ([(600, 1500)], *ERNIE),
    "several": ([(0, 17), (5, 64), (64, 65), (0, 2), (130, 31)], *ERNIE),
    "mixed_decode": ([(1000, 1), (30, 129), (63, 1), (0, 1), (200, 40), (7, 1)], *ERNIE),
    "tiny_model": ([(0, 37), (21, 13), (50, 1), (5, 64)], 4, 2, 16, 16),
    "g8_d64_bs16": ([(40, 1), (33, 20), (0, 70), (100, 45)], 8, 1, 64, 16),
    "mha_d8_bs1": ([(3, 2), (0, 5), (9, 1), (0, 150)], 4, 4, 8, 1),
    "g6_d96_bs8": ([(17, 9), (0, 3), (130, 1), (64, 64)], 12, 2, 96, 8),
    "g12_d128_bs32": ([(90, 33), (0, 80), (5, 1)], 24, 2, 128, 32),
    "g1_d128_bs64": ([(70, 200), (0, 129)], 4, 4, 128, 64),
}


@pytest.mark.parametrize("host", [True, False], ids=["host_lens", "shapes_only"])
@pytest.mark.parametrize("case_name", list(PREFILL_CASES))
def test_prefill(ops, rng, case_name, host):
    seqs, *shape = PREFILL_CASES[case_name]
    case = Case(rng, seqs, *shape)
    assert_bf16_close(case.got(ops, host), case.want())


def test_prefill_head_chunks(ops, rng, monkeypatch):
    """Four warps per block split a group of 5 heads over two blocks (4 heads, then 1)."""
    monkeypatch.setattr(cupy_attention, "PREFILL_MAX_WARPS", 4)
    case = Case(rng, *PREFILL_CASES["mixed_decode"])
    assert_bf16_close(case.got(ops), case.want())


def test_decode_graph_replays_new_lengths(ops, rng, monkeypatch):
    """Captured with lengths hidden from the host and a table as wide as max_model_len 4096,
    replayed after other lengths, tables, queries and KV were written into the same buffers."""
    width = 4096 // 64
    first = Case(rng, [(999, 1), (62, 1), (4095, 1), (0, 1)], *ERNIE, width, 2, blocks=120)
    second = Case(rng, [(64, 1), (3000, 1), (16, 1), (2047, 1)], *ERNIE, width, 2, blocks=120)
    kept: list[cp.ndarray] = []  # allocations made during capture must outlive the graph
    empty = ops.k.empty

    def keep(shape: tuple[int, ...], dtype: np.dtype) -> cp.ndarray:
        kept.append(empty(shape, dtype))
        return kept[-1]

    monkeypatch.setattr(ops.k, "empty", keep)
    batch = first.batch(ops.to_device, host=False)
    q, pool = ops.weight(first.q), ops.weight(first.pool)
    eager = ops.to_host(ops.paged_attention(q, pool, batch, first.scale))
    assert_bf16_close(eager, first.want())

    stream = cp.cuda.Stream(non_blocking=True)
    cp.cuda.Device().synchronize()
    with stream:
        stream.begin_capture()
        out = ops.paged_attention(q, pool, batch, first.scale)
        graph = stream.end_capture()
    graph.launch(stream)
    stream.synchronize()
    np.testing.assert_array_equal(ops.to_host(out), eager)

    batch.seq_lens[...] = cp.asarray(np.asarray(second.lens, np.int32))
    batch.block_tables[...] = cp.asarray(second.tables)
    q.view(np.uint16)[...] = ops.weight(second.q).view(np.uint16)
    pool.view(np.uint16)[...] = ops.weight(second.pool).view(np.uint16)
    cp.cuda.Device().synchronize()
    graph.launch(stream)
    stream.synchronize()
    assert_bf16_close(ops.to_host(out), second.want())
