"""Kernel by kernel: one decode step replayed from its CUDA graph at ERNIE-4.5-21B-A3B's full
shapes (random bf16 weights, --context tokens of random KV per sequence), for Nsight Compute.

The step (forward pass and greedy sampling, as bench_engine.py times it) is replayed once
between cudaProfilerStart and Stop, so `ncu --profile-from-start off` sees exactly its kernels,
each run alone. Their sum against the replayed step's time (printed too, timed outside the
profiled range) says how much of a step is launch gaps and ramps rather than kernels:

    ncu --profile-from-start off --clock-control none --cache-control none --csv \\
        --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \\
        python3 benchmarks/profile_decode_graph.py --batch 1 > b1.csv
    python3 benchmarks/profile_decode_graph.py --report b1.csv [--json b1.json]

The report groups kernels by name (count, total and mean microseconds, DRAM rate) and lists
one MoE layer's launches in order.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import io
import json
import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from bench_engine import BLOCK, FULL_CONFIG, decode_chunks, greedy_step
from engine_device import Device, make_ops, random_weights

from pdserve.config import ModelConfig
from pdserve.engine.model_runner import ModelRunner
from pdserve.model.ernie45_moe import ErnieMoeForCausalLM


def replay(batch: int, context: int, max_model_len: int, repeat: int) -> None:
    import cupy as cp

    dev = Device("cupy")
    c = ModelConfig.from_dict(FULL_CONFIG)
    ops = make_ops(dev)
    model = ErnieMoeForCausalLM(ops, c, random_weights(dev, c))
    per_seq = -(-(context + 1) // BLOCK)
    runner = ModelRunner(model, ops, batch * per_seq, BLOCK, graph_sizes=[batch],
                         max_model_len=max_model_len)  # fmt: skip
    for layer_kv in runner.kv_cache:
        dev.fill_randn(layer_kv)
    chunks = decode_chunks(np.random.default_rng(0), c.vocab_size, batch, context)
    runs = []
    for i in range(repeat + 3):
        dev.sync()
        t0 = time.perf_counter()
        greedy_step(runner, chunks)
        dev.sync()
        if i >= 3:
            runs.append((time.perf_counter() - t0) * 1e3)
    print(f"batch {batch}: graph step {statistics.median(runs):.3f} ms (median of {repeat})",
          file=sys.stderr)  # fmt: skip
    cp.cuda.profiler.start()
    greedy_step(runner, chunks)
    dev.sync()
    cp.cuda.profiler.stop()


def _kernels(text: str) -> list[dict]:
    """ncu's CSV (one row per kernel and metric) as one dict per kernel, in launch order."""
    start = text.find('"ID"')
    rows: dict[int, dict] = {}
    for r in csv.DictReader(io.StringIO(text[start:])):
        k = rows.setdefault(int(r["ID"]), {"name": re.sub(r"\(.*", "", r["Kernel Name"])})
        unit, value = r["Metric Unit"], float(r["Metric Value"].replace(",", ""))
        scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3,
                 "byte": 1.0, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9}.get(unit, 1.0)  # fmt: skip
        k[r["Metric Name"]] = value * scale
    return [rows[i] for i in sorted(rows)]


def report(path: Path, json_path: Path | None) -> None:
    ks = _kernels(path.read_text())
    by: dict[str, list] = defaultdict(list)
    for k in ks:
        by[k["name"]].append(k)
    total = sum(k["gpu__time_duration.sum"] for k in ks)
    print(f"{len(ks)} kernels, {total:.1f} us run one at a time")
    print(f"{'kernel':40} {'n':>4} {'us':>9} {'mean':>7} {'GB/s':>7}")
    rows = []
    for name, group in sorted(by.items(), key=lambda kv: -sum(k["gpu__time_duration.sum"]
                                                              for k in kv[1])):  # fmt: skip
        us = sum(k["gpu__time_duration.sum"] for k in group)
        nbytes = sum(k.get("dram__bytes_read.sum", 0) + k.get("dram__bytes_write.sum", 0)
                     for k in group)  # fmt: skip
        rows.append({"kernel": name, "count": len(group), "us": us, "dram_bytes": nbytes})
        print(f"{name[:40]:40} {len(group):4d} {us:9.1f} {us / len(group):7.2f} "
              f"{nbytes / us / 1e3 if us else 0:7.0f}")  # fmt: skip
    # one layer in order: the launches between the 5th and 6th router launch
    starts = [i for i, k in enumerate(ks) if "route" in k["name"] or "router" in k["name"]]
    if len(starts) > 6:
        print("\none MoE layer's launches, in order (from its router on):")
        for k in ks[starts[5] : starts[6]]:
            print(f"  {k['name'][:48]:48} {k['gpu__time_duration.sum']:7.2f} us")
    if json_path:
        json_path.write_text(json.dumps({"kernels": len(ks), "total_us": total, "by_name": rows},
                                        indent=1))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--set", action="append", default=[], metavar="MODULE.NAME=VALUE",
                   help="override a pdserve.backends constant first, e.g. "
                   "cupy_gemv.GEMV_MAX_TOKENS=32 (A/B runs)")  # fmt: skip
    p.add_argument("--report", type=Path, help="summarise an ncu CSV instead")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    for item in args.set:
        name, value = item.split("=", 1)
        module, attr = name.rsplit(".", 1)
        target = importlib.import_module(f"pdserve.backends.{module}")
        setattr(target, attr, type(getattr(target, attr))(value))
    if args.report:
        report(args.report, args.json)
    else:
        replay(args.batch, args.context, args.max_model_len, args.repeat)


if __name__ == "__main__":
    main()
