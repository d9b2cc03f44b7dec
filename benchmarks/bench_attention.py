"""The attention kernels alone, one layer of ERNIE-4.5-21B-A3B (20 query heads, 4 KV heads of
128, KV blocks of 64 tokens, bf16), on one GPU.

decode   batches of 1/8/32/128 sequences with --context tokens each, one new token apiece. The
         call is captured in a CUDA graph with the host lengths hidden and a block table as wide
         as --max-model-len (as the engine's decode graphs run it); one graph replays it over
         enough KV layers that the KV comes from HBM, not L2. Floor: the KV bytes read
         (batch x context x 4 heads x 128 x 2 (K and V) x 2 bytes) at 4.2 TB/s.
prefill  one sequence of 1k/8k/32k new tokens, no cached prefix, one call captured in a
         graph and replayed (kernel time, not Python's launch cost), for each --prefill-warps
         (the planner's warps per block). FLOPs counted causal: 4 x T^2/2 x heads x D.
         Ceiling: 762 TFLOP/s (the bf16 GEMM peak of the H200).
Each case first checks sampled output rows against a float64 NumPy reference (`err`: relative
error of those rows).

    python benchmarks/bench_attention.py [--json benchmarks/results/bench_attention.json]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import cupy as cp
import numpy as np

from pdserve.backends import cupy_attention
from pdserve.backends.cupy_attention import paged_attention
from pdserve.backends.cupy_kernels import BF16, Kernels, bf16_bits_to_f32
from pdserve.model.forward_batch import ForwardBatch

HEADS, KV_HEADS, D, BS = 20, 4, 128, 64
HBM_TBS, GEMM_TFLOPS = 4.2, 762.0
DEFAULT_JSON = Path(__file__).parent / "results" / "bench_attention.json"


def random_bf16(shape: tuple[int, ...]) -> cp.ndarray:
    bits = cp.random.standard_normal(math.prod(shape), dtype=cp.float32).view(cp.uint32) >> 16
    return bits.astype(cp.uint16).reshape(shape).view(BF16)


def to_f64(x: cp.ndarray) -> np.ndarray:
    return bf16_bits_to_f32(cp.asnumpy(x.view(cp.uint16))).astype(np.float64)


def make_batch(q_lens: list[int], lens: list[int], width: int, host: bool) -> ForwardBatch:
    """Sequences with shuffled, disjoint blocks: sequence s owns blocks of tables[s]."""
    need = [-(-n // BS) for n in lens]
    ids = np.random.default_rng(0).permutation(sum(need)).astype(np.int32)
    tables = np.zeros((len(lens), width), np.int32)
    for s, n in enumerate(need):
        tables[s, :n], ids = ids[:n], ids[n:]
    starts = np.cumsum([0, *q_lens]).tolist()
    t = starts[-1]
    return ForwardBatch(
        input_ids=cp.zeros(t, cp.int64), positions=cp.zeros(t, cp.int64),
        slot_mapping=cp.full(t, -1, cp.int64),
        query_start_loc=cp.asarray(np.asarray(starts, np.int32)),
        seq_lens=cp.asarray(np.asarray(lens, np.int32)), block_tables=cp.asarray(tables),
        logits_indices=cp.asarray(np.asarray(starts[1:], np.int64) - 1), block_size=BS,
        query_start_loc_host=starts if host else None, seq_lens_host=lens if host else None,
    )  # fmt: skip


def reference_rows(
    q: np.ndarray,
    kv: np.ndarray,
    table: np.ndarray,
    ctx: int,
    rows: np.ndarray,
    positions: np.ndarray,
    scale: float,
) -> np.ndarray:
    """Attention of q[rows] (positions given) over one sequence's first ctx keys, float64."""
    blocks = table[: -(-ctx // BS)]
    k = kv[0, blocks].reshape(-1, KV_HEADS, D)[:ctx]  # [C, kv, D]
    v = kv[1, blocks].reshape(-1, KV_HEADS, D)[:ctx]
    qs = q[rows].reshape(len(rows), KV_HEADS, HEADS // KV_HEADS, D)
    s = np.einsum("nkgd,ckd->nkgc", qs, k) * scale
    s = np.where(np.arange(ctx)[None, None, None, :] > positions[:, None, None, None], -np.inf, s)
    p = np.exp(s - s.max(-1, keepdims=True))
    o = np.einsum("nkgc,ckd->nkgd", p / p.sum(-1, keepdims=True), v)
    return o.reshape(len(rows), HEADS, D)


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def bench_decode(k: Kernels, batch_size: int, context: int, max_model_len: int) -> dict:
    per_layer = batch_size * context * KV_HEADS * D * 2 * 2
    layers = max(2, -(-256 * 2**20 // per_layer))  # rotate over >= 256 MB: past the 60 MB L2
    batch = make_batch([1] * batch_size, [context] * batch_size, max_model_len // BS, False)
    blocks = batch_size * -(-context // BS)
    pool = random_bf16((layers, 2, blocks, BS, KV_HEADS, D))
    q = random_bf16((batch_size, HEADS, D))
    scale = D**-0.5
    paged_attention(k, q, pool[0], batch, scale)  # compile and load outside the capture
    graph, outs, stream, _kept = capture(k, lambda: [paged_attention(k, q, pool[i], batch, scale)
                                              for i in range(layers)])  # fmt: skip
    graph.launch(stream)
    stream.synchronize()
    got = to_f64(outs[-1]).astype(np.float32)
    tables = cp.asnumpy(batch.block_tables)
    kv_host = to_f64(pool[layers - 1])
    q_host = to_f64(q)
    want = np.concatenate([
        reference_rows(q_host, kv_host, tables[s], context, np.array([s]),
                       np.array([context - 1]), scale)
        for s in range(batch_size)
    ])  # fmt: skip
    us = 1e3 * replay_ms(graph, stream, max(3, 2000 // layers)) / layers
    tbs = per_layer / us / 1e6
    return {"case": f"decode b={batch_size} ctx={context}", "us": us, "rate": tbs,
            "unit": "TB/s", "pct": 100 * tbs / HBM_TBS, "floor_us": per_layer / HBM_TBS / 1e6,
            "err": rel_err(got, want), "layers_rotated": layers}  # fmt: skip


def capture(k: Kernels, fn: Any) -> tuple[Any, Any, cp.cuda.Stream, list]:
    """fn's launches as a CUDA graph, its result, the stream, and what the launches allocated
    (the caller keeps that alive as long as the graph)."""
    kept: list[cp.ndarray] = []
    empty = k.empty

    def keep(shape: tuple[int, ...], dtype: Any) -> cp.ndarray:
        kept.append(empty(shape, dtype))
        return kept[-1]

    k.empty = keep  # type: ignore[method-assign]
    cp.cuda.Device().synchronize()
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        result = fn()
        graph = stream.end_capture()
    k.empty = empty  # type: ignore[method-assign]
    return graph, result, stream, kept


def replay_ms(graph: Any, stream: cp.cuda.Stream, reps: int) -> float:
    graph.launch(stream)
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record(stream)
    for _ in range(reps):
        graph.launch(stream)
    end.record(stream)
    end.synchronize()
    return cp.cuda.get_elapsed_time(start, end) / reps


def bench_prefill(k: Kernels, tokens: int) -> dict:
    batch = make_batch([tokens], [tokens], -(-tokens // BS), True)
    pool = random_bf16((2, -(-tokens // BS), BS, KV_HEADS, D))
    q = random_bf16((tokens, HEADS, D))
    scale = D**-0.5
    out = paged_attention(k, q, pool, batch, scale)
    rows = np.unique(np.r_[0:16, tokens // 2 : tokens // 2 + 16, tokens - 16 : tokens])
    want = reference_rows(to_f64(q), to_f64(pool), cp.asnumpy(batch.block_tables[0]), tokens,
                          rows, rows, scale)  # fmt: skip
    err = rel_err(to_f64(out.view(cp.uint16)[cp.asarray(rows)]), want)
    reps = max(2, int(4e12 // (2 * tokens * tokens * HEADS * D)))
    graph, _, stream, _kept = capture(k, lambda: paged_attention(k, q, pool, batch, scale))
    us = 1e3 * replay_ms(graph, stream, reps)  # kernel time, without Python's launch cost
    flops = 4 * tokens * tokens / 2 * HEADS * D
    tflops = flops / us / 1e6
    warps = cupy_attention.PREFILL_MAX_WARPS
    return {"case": f"prefill T={tokens} w={warps}", "us": us, "rate": tflops, "unit": "TFLOP/s",
            "pct": 100 * tflops / GEMM_TFLOPS, "floor_us": flops / GEMM_TFLOPS / 1e6,
            "err": err, "ms_28_layers": 28 * us / 1e3}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decode-batches", type=int, nargs="*", default=[1, 8, 32, 128])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--prefill", type=int, nargs="*", default=[1024, 8192, 32768])
    parser.add_argument("--prefill-warps", type=int, nargs="*",  # at most 8: see the planner
                        default=[cupy_attention.PREFILL_MAX_WARPS])  # fmt: skip
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args()
    k = Kernels()
    rows: list[dict[str, Any]] = []
    for b in args.decode_batches:
        rows.append(bench_decode(k, b, args.context, args.max_model_len))
    for t in args.prefill:
        for w in args.prefill_warps:
            cupy_attention.PREFILL_MAX_WARPS = w
            rows.append(bench_prefill(k, t))
    print(f"{cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}, {k.num_sms} SMs; "
          f"peaks {HBM_TBS} TB/s, {GEMM_TFLOPS} TFLOP/s")  # fmt: skip
    print(f"{'case':26} {'us':>9} {'floor_us':>9} {'rate':>8} {'unit':8} {'%peak':>6} {'err':>8}")
    for r in rows:
        print(f"{r['case']:26} {r['us']:9.1f} {r['floor_us']:9.2f} {r['rate']:8.2f} "
              f"{r['unit']:8} {r['pct']:6.1f} {r['err']:8.1e}")  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    report = {"rows": rows, "args": vars(args)}
    args.json.write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
