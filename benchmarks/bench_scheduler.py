"""Scheduler and block manager CPU cost per engine step, without the model.

For each number N of running requests: add N requests with random prompts, run steps until all
are decoding, then time pure-decode steps. A step is `Scheduler.schedule()` plus the bookkeeping
`EngineCore.step` does after the model (advance `num_computed_tokens`, register full blocks in the
prefix cache, append the sampled token, check stop), with a fake token in place of the model.

Compared with the GPU decode step the design targets (DESIGN.md 5a and the GPU issue): about
2.2 ms at batch 1 and 12 ms at batch 32. Host time not overlapped with the GPU adds to each step.

    python benchmarks/bench_scheduler.py [--sizes 1,8,32] [--steps 300] [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from time import perf_counter_ns

import numpy as np

from pdserve.engine.block_manager import BlockManager
from pdserve.engine.request import Request
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import Scheduler, SchedulerConfig, StepPlan

BLOCK_SIZE = 64  # tokens
PROMPT_LEN = 512  # tokens
VARIANTS = {"random": 0, "shared": 256}  # name -> prompt tokens common to all requests
VOCAB = 103_424  # ERNIE-4.5's vocabulary
MAX_BATCHED_TOKENS = 8192
WARMUP_STEPS = 50  # untimed decode steps before the timed ones
SEED = 0
BUDGET_B1_MS = 2.2  # target GPU decode step at batch 1
BUDGET_B32_MS = 12.0  # target GPU decode step at batch 32
DEFAULT_JSON = Path(__file__).parent / "results" / "bench_scheduler.json"


def budget_ms(n: int) -> float:
    """Step time the overhead of N requests is compared with: the batch-1 target below 32 (the
    strict choice, as a batch of 8 runs at least as long), the batch-32 target from 32 up."""
    return BUDGET_B1_MS if n < 32 else BUDGET_B32_MS


@dataclass
class Row:
    variant: str
    n: int
    admit_steps: int  # steps until every request is decoding
    admit_ms: float  # schedule + bookkeeping summed over those steps
    sched_mean_us: float
    sched_p99_us: float
    book_mean_us: float
    book_p99_us: float
    total_mean_us: float
    total_p99_us: float
    total_median_us: float  # in the JSON only: steadier than the mean on a noisy machine
    us_per_req: float
    budget_ms: float
    pct_of_budget: float


def step(sched: Scheduler, token: int, max_len: int) -> tuple[StepPlan, int, int]:
    """One engine step without the model: the plan and the ns spent in schedule, bookkeeping."""
    t0 = perf_counter_ns()
    plan = sched.schedule()
    t1 = perf_counter_ns()
    for req, n in zip(plan.requests, plan.num_new_tokens):
        req.num_computed_tokens += n
        sched.blocks.cache_blocks(req)
        if req.num_computed_tokens == req.num_tokens:
            req.append_token(token)
            if req.check_stop(max_len) is not None:
                raise RuntimeError(f"{req.request_id} finished during the benchmark")
    t2 = perf_counter_ns()
    return plan, t1 - t0, t2 - t1


def run_case(variant: str, n: int, steps: int) -> Row:
    rng = np.random.default_rng(SEED)
    # none finishes while timed: those admitted first decode while the rest are admitted
    max_tokens = WARMUP_STEPS + steps + 2 * n * PROMPT_LEN // MAX_BATCHED_TOKENS + 8
    max_len = PROMPT_LEN + max_tokens
    # twice what the requests can reach, so the prefill reserve (kv_cache_ratio) never binds
    num_blocks = 2 * n * -(-max_len // BLOCK_SIZE) + 1
    blocks = BlockManager(num_blocks, BLOCK_SIZE, enable_prefix_caching=True)
    config = SchedulerConfig(max(512, n), MAX_BATCHED_TOKENS, max_model_len=max_len)
    sched = Scheduler(config, blocks)
    shared = rng.integers(0, VOCAB, VARIANTS[variant]).tolist()
    tails = rng.integers(0, VOCAB, (n, PROMPT_LEN - len(shared))).tolist()
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    reqs = [Request(f"r{i}", shared + tails[i], params) for i in range(n)]
    for req in reqs:
        sched.add(req)
    tokens = rng.integers(0, VOCAB, 4096).tolist()  # fake samples, used in turn

    gc.collect()
    admit_ns, admit_steps = 0, 0
    while sched.waiting or any(r.num_output_tokens == 0 for r in reqs):
        plan, s_ns, b_ns = step(sched, tokens[admit_steps % 4096], max_len)
        if plan.preempted:
            raise RuntimeError("preemption during admission: the pool is too small")
        admit_ns += s_ns + b_ns
        admit_steps += 1

    gc.collect()
    times = []
    for i in range(WARMUP_STEPS + steps):
        plan, s_ns, b_ns = step(sched, tokens[(admit_steps + i) % 4096], max_len)
        if len(plan.requests) != n or plan.total_tokens != n or plan.preempted:
            raise RuntimeError(f"step {i} is not a pure decode of {n} requests")
        if i >= WARMUP_STEPS:
            times.append((s_ns, b_ns))
    blocks.check_integrity(reqs)

    s, b = (np.array(times) / 1e3).T  # [steps] us each
    t = s + b
    stats = [v for x in (s, b, t) for v in (float(x.mean()), float(np.percentile(x, 99)))]
    mean, budget = stats[4], budget_ms(n)
    pct = mean / (budget * 1e3) * 100
    median = float(np.median(t))
    return Row(variant, n, admit_steps, admit_ns / 1e6, *stats, median, mean / n, budget, pct)


# (title, Row field, width, format spec; "" for text)
COLUMNS = [
    ("variant", "variant", 7, ""),
    ("N", "n", 4, "d"),
    ("adm.steps", "admit_steps", 9, "d"),
    ("adm.ms", "admit_ms", 7, ".2f"),
    ("sched", "sched_mean_us", 7, ".1f"),
    ("p99", "sched_p99_us", 7, ".1f"),
    ("book", "book_mean_us", 7, ".1f"),
    ("p99", "book_p99_us", 7, ".1f"),
    ("total", "total_mean_us", 7, ".1f"),
    ("p99", "total_p99_us", 7, ".1f"),
    ("us/req", "us_per_req", 6, ".2f"),
    ("budget.ms", "budget_ms", 9, ".1f"),
    ("%budget", "pct_of_budget", 7, ".2f"),
]


def print_table(rows: list[Row], steps: int) -> None:
    print(
        f"Scheduler + block manager CPU time per decode step (no model), in us: mean and p99 of "
        f"{steps} steps. Prompts {PROMPT_LEN} tokens (shared: first {VARIANTS['shared']} common), "
        f"block {BLOCK_SIZE}, prefix caching on.\nCompared with the target GPU decode step "
        f"(DESIGN.md 5a, GPU issue): {BUDGET_B1_MS} ms at batch 1 (for N < 32), {BUDGET_B32_MS} "
        "ms at batch 32 (for N >= 32); %budget = mean total / budget."
    )
    print("  ".join(f"{t:>{w}}" if fmt else f"{t:<{w}}" for t, _, w, fmt in COLUMNS))
    for r in rows:
        cells = [(getattr(r, f), w, fmt) for _, f, w, fmt in COLUMNS]
        print("  ".join(f"{v:>{w}{fmt}}" if fmt else f"{v:<{w}}" for v, w, fmt in cells))


def int_list(text: str) -> list[int]:
    return [int(s) for s in text.split(",")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sizes", type=int_list, default=[1, 8, 32, 64, 128, 256, 512], help="running requests N"
    )
    parser.add_argument("--steps", type=int, default=300, help="timed decode steps per N")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="results file")
    args = parser.parse_args(argv)
    if min(args.sizes) < 1 or args.steps < 1:
        parser.error("--sizes must be positive integers and --steps >= 1")

    rows = [run_case(variant, n, args.steps) for variant in VARIANTS for n in args.sizes]
    print_table(rows, args.steps)
    config = dict(sizes=args.sizes, steps=args.steps, warmup_steps=WARMUP_STEPS, seed=SEED,
                  prompt_len=PROMPT_LEN, shared_prefix=VARIANTS, block_size=BLOCK_SIZE,
                  max_num_batched_tokens=MAX_BATCHED_TOKENS, prefix_caching=True,
                  budget_ms={"batch_1": BUDGET_B1_MS, "batch_32": BUDGET_B32_MS})  # fmt: skip
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": f"{platform.python_implementation()} {sys.version.split()[0]}",
    }
    result = {"config": config, "machine": machine, "rows": [asdict(r) for r in rows]}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
