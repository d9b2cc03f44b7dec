"""A/B of backend switches on whole decode steps: one full-size ERNIE-4.5-21B-A3B model (random
bf16 weights, --context tokens of random KV per sequence), each variant's decode graph captured
afresh and replayed in turns (A B C A B C ...), so every variant meets the same machine state.

    python3 benchmarks/ab_decode_graph.py --batches 1,8,32 \\
        --variant base: --variant no-prefetch:cupy_prefetch.ENABLED=0 [--json out.json]

A variant is NAME:MODULE.ATTR=VALUE,... over pdserve.backends modules (empty: the defaults).
Every attribute any variant sets is reset to its default before the next variant applies its
own. Each variant's greedy tokens are checked against the first's. Prints ms per step (median
of the rounds' medians) and each variant against the first.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import statistics
import time
from pathlib import Path

import numpy as np
from bench_engine import BLOCK, FULL_CONFIG, decode_chunks, greedy_step
from engine_device import Device, make_ops, random_weights

from pdserve.config import ModelConfig
from pdserve.engine.model_runner import ModelRunner
from pdserve.model.ernie45_moe import ErnieMoeForCausalLM


def parse_variant(text: str) -> tuple[str, list[tuple[object, str, str]]]:
    name, _, sets = text.partition(":")
    items = []
    for item in filter(None, sets.split(",")):
        path, value = item.split("=", 1)
        module, attr = path.rsplit(".", 1)
        items.append((importlib.import_module(f"pdserve.backends.{module}"), attr, value))
    return name, items


def apply(variant: list, defaults: dict) -> None:
    for (module, attr), value in defaults.items():
        setattr(module, attr, value)
    for module, attr, value in variant:
        setattr(module, attr, type(defaults[(module, attr)])(value))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--variant", action="append", required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    import cupy as cp

    variants = [parse_variant(v) for v in args.variant]
    defaults = {(m, a): getattr(m, a) for _, items in variants for m, a, _ in items}
    dev = Device("cupy")
    c = ModelConfig.from_dict(FULL_CONFIG)
    ops = make_ops(dev)
    model = ErnieMoeForCausalLM(ops, c, random_weights(dev, c))
    batches = [int(b) for b in args.batches.split(",")]
    per_seq = -(-(args.context + 1) // BLOCK)
    runner = ModelRunner(model, ops, max(batches) * per_seq, BLOCK)
    for layer_kv in runner.kv_cache:
        dev.fill_randn(layer_kv)
    max_blocks = -(-args.max_model_len // BLOCK)
    results: dict = {}
    for b in batches:
        chunks = decode_chunks(np.random.default_rng(0), c.vocab_size, b, args.context)
        runs: dict[str, list[float]] = {name: [] for name, _ in variants}
        tokens: dict[str, np.ndarray] = {}
        for _ in range(args.rounds):
            for name, items in variants:
                apply(items, defaults)
                runner.graphs = None
                gc.collect()
                runner.graphs = ops.decode_graphs(model.forward, runner.kv_cache, BLOCK,
                                                  max_blocks, [b])  # fmt: skip
                ids, _ = greedy_step(runner, chunks)  # warm-up
                tokens.setdefault(name, np.asarray(ids))
                times = []
                for _ in range(args.steps):
                    dev.sync()
                    t0 = time.perf_counter()
                    greedy_step(runner, chunks)
                    dev.sync()
                    times.append((time.perf_counter() - t0) * 1e3)
                runs[name].append(statistics.median(times))
        apply([], defaults)
        runner.graphs = None
        cp.get_default_memory_pool().free_all_blocks()
        first = variants[0][0]
        row = {}
        for name, _ in variants:
            ms = statistics.median(runs[name])
            same = bool(np.array_equal(tokens[name], tokens[first]))
            row[name] = {"ms": ms, "rounds_ms": runs[name], "same_tokens": same}
        results[str(b)] = row
        base = row[first]["ms"]
        cells = [
            f"{n} {r['ms']:.3f} ms ({r['ms'] / base:.3f}x"
            f"{'' if r['same_tokens'] else ', TOKENS DIFFER'})"
            for n, r in row.items()
        ]
        print(f"batch {b}: " + "  ".join(cells), flush=True)  # fmt: skip
    print("\nms per decode step (median of rounds), context", args.context)
    names = [n for n, _ in variants]
    print(f"{'batch':>6} " + " ".join(f"{n:>16}" for n in names))
    for b, row in results.items():
        print(f"{b:>6} " + " ".join(f"{row[n]['ms']:>16.3f}" for n in names))
    if args.json:
        args.json.write_text(json.dumps({"variants": args.variant, "context": args.context,
                                         "results": results}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
