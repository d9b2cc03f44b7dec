"""L2 prefetches in decode graphs (backends/cupy_prefetch.py, csrc/prefetch.cu): they are hints,
so a graph with them computes exactly what a graph without them computes, and the prefetch
kernels change no memory whatever the sizes."""

from __future__ import annotations

import numpy as np
import pytest

from pdserve.backends import gpu_unavailable_reason
from pdserve.engine.model_runner import ModelRunner, SeqChunk
from pdserve.model.ernie45_moe import load_model
from pdserve.model.tiny import ensure_tiny_model

REASON = gpu_unavailable_reason()
if REASON is not None:
    pytest.skip(f"GPU tests need CuPy and a CUDA GPU: {REASON}", allow_module_level=True)
else:
    import cupy as cp

    from pdserve.backends import cupy_kernels, cupy_prefetch
    from pdserve.backends.cupy_ops import CupyOps

pytestmark = pytest.mark.gpu
BLOCK = 16


def test_prefetch_kernels_change_no_memory(ops, rng):
    """Odd byte counts, more than four arrays (two launches), experts named by a grouping
    with empty slots: the kernels run to completion and every byte stays as it was."""
    sizes = (1, 77, 4097, 300_001, 64, 9)
    arrays = [cp.asarray(rng.integers(0, 2**16, n, dtype=np.uint16)) for n in sizes]
    stacked = cp.asarray(rng.integers(0, 2**16, (7, 33, 45), dtype=np.uint16))
    slot_expert = cp.asarray(np.array([5, 0, 6, -1, -1], np.int32))
    before = [cp.asnumpy(a) for a in (*arrays, stacked)]
    cupy_prefetch.l2(ops.k, arrays)
    cupy_prefetch.expert_matrices(ops.k, slot_expert, stacked)
    cp.cuda.Device().synchronize()
    for a, b in zip((*arrays, stacked), before):
        assert np.array_equal(cp.asnumpy(a), b)


@pytest.mark.parametrize("inline", [0, 1])
@pytest.mark.parametrize("batch", [1, 3])
def test_graphs_compute_the_same_with_and_without_prefetching(batch, inline, monkeypatch):
    """Decode graphs captured with prefetches (on a side stream, or inline in the launch chain)
    and evict-first weight loads, and with neither, give bit-identical logits for the same
    batch."""
    monkeypatch.setattr(cupy_prefetch, "INLINE", inline)
    ops = CupyOps()
    model = load_model(ensure_tiny_model(), ops, progress=False)
    runner = ModelRunner(model, ops, 32, BLOCK)
    rng = np.random.default_rng(batch)
    seqs = [rng.integers(8, 264, n).tolist() for n in (5, 40, 17)[:batch]]
    tables = [list(range(4 * i, 4 * i + 4)) for i in range(batch)]
    runner.execute([SeqChunk(s, 0, len(s), t) for s, t in zip(seqs, tables)])
    chunks = [SeqChunk(s, len(s) - 1, 1, t) for s, t in zip(seqs, tables)]
    logits = []
    for on in (1, 0):
        monkeypatch.setattr(cupy_prefetch, "ENABLED", on)
        monkeypatch.setattr(cupy_kernels, "EVICT_FIRST", on)
        runner.graphs = ops.decode_graphs(model.forward, runner.kv_cache, BLOCK, 8, [4])
        logits.append(cp.asnumpy(runner.execute_device(chunks)))
    assert np.isfinite(logits[0]).all()
    assert np.array_equal(logits[0], logits[1])
