"""Decode under CUDA graphs on the tiny model: a replay computes what the same work computes
eagerly, padding rows write no KV, and 64 graph decode steps track the eager engine path."""

from __future__ import annotations

import numpy as np
import pytest

from pdserve.backends import gpu_unavailable_reason
from pdserve.engine.llm import LLM
from pdserve.engine.model_runner import ModelRunner, SeqChunk
from pdserve.engine.sampling_params import SamplingParams
from pdserve.model.ernie45_moe import load_model
from pdserve.model.tiny import ensure_tiny_model

REASON = gpu_unavailable_reason()
if REASON is not None:
    pytest.skip(f"GPU tests need CuPy and a CUDA GPU: {REASON}", allow_module_level=True)
else:
    import cupy as cp

    from pdserve.backends.cupy_ops import CupyOps

pytestmark = pytest.mark.gpu
BLOCK = 16
NUM_BLOCKS = 64
MAX_LEN = 320  # 20 blocks per sequence in the graphs' tables
SIZES = (1, 4, 8)


@pytest.fixture(scope="module")
def runners() -> tuple[ModelRunner, ModelRunner]:
    """An eager runner and a graph runner sharing one model and one KV pool."""
    ops = CupyOps()
    model = load_model(ensure_tiny_model(), ops, progress=False)
    eager = ModelRunner(model, ops, NUM_BLOCKS, BLOCK)
    graphs = ModelRunner(model, ops, NUM_BLOCKS, BLOCK, kv_cache=eager.kv_cache,
                         graph_sizes=SIZES, max_model_len=MAX_LEN)  # fmt: skip
    return eager, graphs


def prefilled(eager: ModelRunner, lens: list[int], seed: int) -> tuple[list, list]:
    """Prompts of `lens` prefilled eagerly into scattered blocks: (token lists, tables)."""
    rng = np.random.default_rng(seed)
    ids = rng.permutation(NUM_BLOCKS).tolist()
    seqs, tables = [], []
    for n in lens:
        need = -(-(n + 70) // BLOCK)
        tables.append(ids[:need])
        ids = ids[need:]
        seqs.append(rng.integers(8, 264, n).tolist())
    eager.execute([SeqChunk(s, 0, len(s), t) for s, t in zip(seqs, tables)])
    return seqs, tables


def decode_chunks(seqs: list, tables: list) -> list[SeqChunk]:
    return [SeqChunk(s, len(s) - 1, 1, t) for s, t in zip(seqs, tables)]


@pytest.mark.parametrize("size", [1, 2, 3, 5, 32])
def test_staged_inputs_are_16_byte_aligned(size):
    """Every array of a graph's batch starts on 16 bytes, as the kernels' loads need: a
    misaligned one would be copied inside every layer of the graph."""
    from pdserve.backends.cupy_graphs import _StaticInputs

    staged = _StaticInputs(size, 7)
    assert all(a.data.ptr % 16 == 0 for a in staged.dev.values())


def test_replay_equals_eager_forward_of_the_same_padded_batch(runners):
    """Graph replay against the same kernels launched eagerly on the graph's own padded batch:
    any difference would be a capture bug (stale input, a host-side value frozen at capture)."""
    eager, graphs = runners
    seqs, tables = prefilled(eager, [5, 40, 17], seed=1)  # 3 rows: bucket 4, one padding row
    dg = graphs.graphs
    for _ in range(6):  # lengths change every step; the graph must follow
        chunks = decode_chunks(seqs, tables)
        host = graphs.build_batch(chunks)
        got = cp.asnumpy(graphs.execute_device(chunks))  # [3, V]
        static = dg.graphs[4].inputs
        static.write(host)
        static.upload(cp.cuda.get_current_stream())
        want = cp.asnumpy(graphs.model.forward(static.batch(BLOCK), graphs.kv_cache))[:3]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * np.abs(want).max())
        assert (got.argmax(-1) == want.argmax(-1)).all()
        for s, row in zip(seqs, got):
            s.append(int(row.argmax()))


def test_padding_rows_write_no_kv(runners):
    eager, graphs = runners
    seqs, tables = prefilled(eager, [9, 30], seed=2)  # bucket 4: two padding rows
    rng = np.random.default_rng(3)
    kv = graphs.kv_cache
    kv.view(np.uint16)[...] = cp.asarray(rng.integers(0, 0x3F00, kv.shape, dtype=np.uint16))
    before = cp.asnumpy(kv.view(np.uint16))
    graphs.execute_device(decode_chunks(seqs, tables))
    cp.cuda.Device().synchronize()
    changed = cp.asnumpy(kv.view(np.uint16)) != before  # [layers, 2, blocks, block, heads, D]
    slots = {(t[(len(s) - 1) // BLOCK], (len(s) - 1) % BLOCK) for s, t in zip(seqs, tables)}
    where = {(int(b), int(o)) for b, o in zip(*np.nonzero(changed.any(axis=(0, 1, 4, 5))))}
    assert where <= slots and where, f"KV written at {sorted(where - slots)} besides {slots}"


def test_64_graph_decode_steps_track_the_eager_path(runners):
    """Teacher-forced: both paths see the graph path's tokens; the eager path plans attention
    from host lengths, so the two differ by summation order only."""
    eager, graphs = runners
    seqs, tables = prefilled(eager, [7, 33, 50, 3, 21], seed=4)  # bucket 8
    errs, agree = [], []
    for _ in range(64):
        chunks = decode_chunks(seqs, tables)
        got = cp.asnumpy(graphs.execute_device(chunks))
        want = eager.execute(chunks)
        errs.append(np.linalg.norm(got - want) / np.linalg.norm(want))
        agree.append(np.mean(got.argmax(-1) == want.argmax(-1)))
        for s, row in zip(seqs, got):
            s.append(int(row.argmax()))
    print(f"max relative error {max(errs):.2e}, argmax agreement {np.mean(agree):.1%}")
    assert max(errs) < 2e-2 and np.mean(agree) >= 0.97


def test_batches_that_fit_no_graph_run_eagerly(runners):
    eager, graphs = runners
    seqs, tables = prefilled(eager, [6] * 9, seed=5)  # 9 decodes > the largest bucket (8)
    got = graphs.execute(decode_chunks(seqs, tables))
    want = eager.execute(decode_chunks(seqs, tables))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)  # both eager: same launches
    host = graphs.build_batch([SeqChunk(seqs[0], 0, len(seqs[0]), tables[0])])  # a prefill
    assert not graphs.graphs.fits(host)
    long = graphs.build_batch([SeqChunk(list(range(8, 8 + MAX_LEN + 1)), MAX_LEN, 1,
                                        list(range(21)))])  # fmt: skip
    assert not graphs.graphs.fits(long)  # a table wider than the graphs'


def test_engine_with_graphs_and_device_greedy_sampling():
    """The offline LLM with decode graphs and the device's greedy sampler: each token and its
    logprob, scored by one eager prefill of the whole output (teacher forcing), is that pass's
    argmax with its log-softmax."""
    prompts = [list(range(8, 8 + n)) for n in (5, 23, 11)]
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    llm = LLM("tiny", backend="cupy", block_size=BLOCK, num_blocks=NUM_BLOCKS,
              max_model_len=MAX_LEN, max_num_seqs=4, progress=False,
              graph_sizes=(1, 2, 4))  # fmt: skip
    outs: list[list] = [[] for _ in prompts]
    for step in llm.generate(prompts, [greedy] * len(prompts)):
        for i, o in step:
            outs[i].append((o.token_id, o.logprob))
    assert [len(o) for o in outs] == [24] * 3
    ref = ModelRunner(llm.model, llm.ops, NUM_BLOCKS, BLOCK)
    hits = total = 0
    for p, o in zip(prompts, outs):
        seq = p + [t for t, _ in o]
        logits = ref.execute([SeqChunk(seq, 0, len(seq), list(range(NUM_BLOCKS)),
                                       all_logits=True)])[len(p) - 1 : -1]  # fmt: skip
        lse = logits.max(-1) + np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))
        ids = np.array([t for t, _ in o])
        hits += int((logits.argmax(-1) == ids).sum())
        total += len(ids)
        want = logits[np.arange(len(ids)), ids] - lse
        diff = np.abs(np.array([lp for _, lp in o]) - want)  # bf16 noise, routing near-ties
        assert np.median(diff) <= 0.02 and diff.max() <= 0.5, diff
    assert hits / total >= 0.95, f"{hits}/{total} tokens are the teacher-forced argmax"
