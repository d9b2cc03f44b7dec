"""Engine step times on one GPU at ERNIE-4.5-21B-A3B's full shapes, random bf16 weights.

Measured in one run:
  decode    one greedy step as the engine runs it (`ModelRunner.execute_device`, then the
            argmax on the device), one new token per sequence, every sequence with --context
            tokens already in the KV cache, at each batch of --decode-batches: eagerly (`ours`)
            and replayed from the decode CUDA graphs (`graphs`, unless --no-graphs);
  prefill   one sequence of each length of --prefill, in --chunk-token passes as the scheduler
            cuts it (8192: a 32k prompt is four passes); a length over the largest one timed
            runs only if its time, extrapolated from that one, fits --max-extrapolated-s;
  profile   every `ops` call of one forward pass timed on the device by category (attention,
            MoE experts, each kind of linear, norms, ...). A spin kernel holds the GPU until the
            host has queued the layers under measurement, so the events time kernels, not
            launch gaps: `busy` is what the kernels cost, `host` what queueing them costs.
Each figure is compared with
  its floor the larger of bytes / copy bandwidth and FLOPs / bf16 GEMM rate, both measured at
            the start of the run (a device copy counted read + write; an 8192^3 GEMM through
            cuBLAS, as our linears run). Bytes: every weight a step reads (bf16; the experts a
            batch really routes to, counted per layer from the ids the router chose) plus the
            KV read and written. FLOPs: 2 per active weight per token, plus causal attention;
  the peer  transformers' Ernie4_5_MoeForCausalLM, bf16, on the same GPU in the same process
            after our model is freed (benchmarks/hf_peer.py): eager forwards, and generate with
            cache_implementation="static" (torch.compile with CUDA graphs) if time is left.
Weights are drawn on the GPU (std 0.02 like transformers' initializer, RMSNorm weights 1), so the
real `ErnieMoeForCausalLM.forward` runs through `ModelRunner` with nothing uploaded from the
host. Step times are host wall time around synchronised calls, median of the timed runs after
warmup. The device, weights and ceilings live in engine_device.py, the per-op profile in
engine_profile.py, floors and tables in engine_report.py.

    python benchmarks/bench_engine.py [--json benchmarks/results/bench_engine.json]
    python benchmarks/bench_engine.py --tiny --backend numpy   # smoke test of the script on a CPU
    python benchmarks/bench_engine.py --report benchmarks/results/bench_engine.json   # tables
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from engine_device import Device, make_ops, measure_ceilings, random_weights
from engine_profile import OpProfiler, profile_row
from engine_report import add_floor, decode_floor, prefill_floor, print_tables

from pdserve.config import ModelConfig
from pdserve.engine.model_runner import ModelRunner, SeqChunk
from pdserve.model.ernie45_moe import ErnieMoeForCausalLM
from pdserve.model.tiny import TINY_CONFIG

DEFAULT_JSON = Path(__file__).parent / "results" / "bench_engine.json"
FULL_CONFIG: dict[str, Any] = {  # DESIGN.md section 6; also transformers' defaults
    "architectures": ["Ernie4_5_MoeForCausalLM"], "model_type": "ernie4_5_moe",
    "vocab_size": 103424, "hidden_size": 2560, "intermediate_size": 12288,
    "num_hidden_layers": 28, "num_attention_heads": 20, "num_key_value_heads": 4,
    "head_dim": 128, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "tie_word_embeddings": True, "use_bias": False, "hidden_act": "silu",
    "moe_num_experts": 64, "moe_k": 6, "moe_intermediate_size": 1536,
    "moe_num_shared_experts": 2, "moe_layer_start_index": 1, "moe_layer_end_index": 27,
    "moe_layer_interval": 1, "moe_norm_min": 1e-12, "bos_token_id": 1, "eos_token_id": 2,
    "pad_token_id": 0,
}  # fmt: skip
BLOCK = 64  # tokens per KV block, the engine's default


def median_ms(fn: Callable[[], Any], dev: Device, warmup: int, repeat: int) -> tuple[list, Any]:
    """Wall times of `repeat` synchronised calls after `warmup`, and the last call's result."""
    for _ in range(warmup):
        fn()
    runs, out = [], None
    for _ in range(repeat):
        dev.sync()
        t0 = time.perf_counter()
        out = fn()
        dev.sync()
        runs.append((time.perf_counter() - t0) * 1e3)
    return runs, out


def greedy_step(runner: ModelRunner, chunks: list[SeqChunk]) -> tuple[np.ndarray, np.ndarray]:
    """One decode step as the engine runs it for greedy requests: the forward pass, then the
    argmax on the device (only ids and logprobs come back), or on the host where the backend
    has no device sampler. Returns (token ids, their logprobs)."""
    logits = runner.execute_device(chunks)
    picked = runner.ops.greedy_sample(logits)
    if picked is None:
        host = runner.ops.to_host(logits)
        ids = np.argmax(host, axis=-1)
        return ids, host[np.arange(len(ids)), ids] - np.log(np.exp(host).sum(axis=-1))
    return picked


def decode_chunks(rng: np.random.Generator, vocab: int, batch: int, context: int) -> list:
    """`batch` decode rows of one new token over `context` random tokens each, sequence s in
    KV blocks s * per_seq onwards (per_seq = the blocks one sequence needs)."""
    per_seq = -(-(context + 1) // BLOCK)
    return [
        SeqChunk(
            rng.integers(3, vocab, context + 1).tolist(),
            context,
            1,
            list(range(s * per_seq, (s + 1) * per_seq)),
        )  # fmt: skip
        for s in range(batch)
    ]


def step_row(runs: list[float], logits: Any) -> dict:
    return {
        "ms": statistics.median(runs),
        "runs_ms": runs,
        "logits_finite": bool(np.isfinite(logits).all()),
    }


def run_ours(args: argparse.Namespace, dev: Device, cfg: dict, out: dict, clock: Clock,
             save: Callable[[], None]) -> None:  # fmt: skip
    c = ModelConfig.from_dict(cfg)
    ops = make_ops(dev)
    out["ceilings"] = ceil = measure_ceilings(dev, ops, args.copy_mb << 20, args.gemm_n)
    dev.free()
    print(
        f"ceilings: copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write), "
        f"bf16 GEMM {ceil['gemm_flops_per_s'] / 1e12:.0f} TFLOP/s",
        flush=True,
    )
    t0 = time.perf_counter()
    model = ErnieMoeForCausalLM(ops, c, random_weights(dev, c))
    per_seq = -(-(args.context + 1) // BLOCK)
    num_blocks = max(
        max(args.decode_batches, default=1) * per_seq, -(-max(args.prefill, default=1) // BLOCK)
    )
    runner = ModelRunner(model, ops, num_blocks, BLOCK)
    for layer_kv in runner.kv_cache:  # random KV: attention never reads zeros
        dev.fill_randn(layer_kv)
    dev.sync()
    out["ours"] = {
        "build_s": time.perf_counter() - t0,
        "kv_blocks": num_blocks,
        "block_size": BLOCK,
        "cuda_graphs": False,
    }
    print(f"model built in {out['ours']['build_s']:.1f} s", flush=True)
    graph_runner = None
    if args.graphs and ops.name != "numpy":
        t0 = time.perf_counter()
        graph_runner = ModelRunner(model, ops, num_blocks, BLOCK, kv_cache=runner.kv_cache,
                                   graph_sizes=args.decode_batches,
                                   max_model_len=args.max_model_len)  # fmt: skip
        out["ours"].update(cuda_graphs=True, capture_s=time.perf_counter() - t0,
                           graph_max_model_len=args.max_model_len)  # fmt: skip
        print(f"decode graphs captured in {out['ours']['capture_s']:.1f} s", flush=True)
    prof = OpProfiler(dev, ops, model)
    rng = np.random.default_rng(0)
    reserve = 0 if args.no_peer else args.peer_reserve_s
    for b in args.decode_batches:
        if clock.left() < reserve + 15:
            out["skipped"].append(f"ours decode batch {b}: out of time")
            continue
        with section(out, f"ours decode batch {b}"):
            chunks = decode_chunks(rng, c.vocab_size, b, args.context)
            runs, (ids, logprobs) = median_ms(
                lambda ch=chunks: greedy_step(runner, ch), dev, args.warmup, args.repeat
            )
            row = {"batch": b, "context": args.context, **step_row(runs, logprobs)}
            if graph_runner is not None:
                runs, (graph_ids, _) = median_ms(
                    lambda ch=chunks: greedy_step(graph_runner, ch), dev, args.warmup, args.repeat
                )
                row.update(graph_ms=statistics.median(runs), graph_runs_ms=runs,
                           graph_same_tokens=float(np.mean(graph_ids == ids)))  # fmt: skip
            touched = profile_row(row, prof, runner, chunks, dev, 3, args.window)
            add_floor(row, decode_floor(c, b, args.context, touched), ceil)
            out["decode"].append(row)
            print(f"decode batch {b}: {row['ms']:.2f} ms eager, {row.get('graph_ms', 0):.2f} ms "
                  f"graphs (floor {row['floor_ms']:.2f})", flush=True)  # fmt: skip
            save()
    for tokens in sorted(args.prefill):
        with section(out, f"ours prefill {tokens}"):
            ids = rng.integers(3, c.vocab_size, tokens).tolist()
            table = list(range(-(-tokens // BLOCK)))
            passes = [
                [SeqChunk(ids, s, min(args.chunk, tokens - s), table)]
                for s in range(0, tokens, args.chunk)
            ]
            base = max(
                (r for r in out["prefill"] if "profile" in r),
                key=lambda r: r["tokens"],
                default=None,
            )
            predicted = predict_prefill_s(base, tokens)
            if clock.left() < reserve + 10 + 3 * predicted or (
                len(passes) > 1 and predicted > args.max_extrapolated_s
            ):
                out["skipped"].append(
                    f"ours prefill {tokens}: predicted {predicted:.0f} s, "
                    f"{clock.left():.0f} s of budget left"
                )
                continue

            def run_passes(passes: list = passes) -> Any:
                return [runner.execute(p) for p in passes][-1]

            one = len(passes) == 1
            runs, logits = median_ms(
                run_passes,
                dev,
                min(args.warmup, 1) if one else 0,
                args.prefill_repeat if one else 1,
            )
            row = {
                "tokens": tokens,
                "passes": len(passes),
                "predicted_s": predicted,
                **step_row(runs, logits),
            }
            touched = [c.moe_num_experts] * (c.num_hidden_layers - 1)
            if one:
                touched = profile_row(row, prof, runner, passes[0], dev, 1, c.num_hidden_layers + 1)
            add_floor(row, prefill_floor(c, tokens, len(passes), touched), ceil)
            out["prefill"].append(row)
            print(f"prefill {tokens}: {row['ms']:.1f} ms (floor {row['floor_ms']:.1f})", flush=True)
            save()


def predict_prefill_s(base: dict | None, tokens: int) -> float:
    """Seconds for a prefill of `tokens`, scaled from a profiled shorter one: attention grows
    with the square of the length, everything else linearly."""
    if base is None:
        return 0.0
    attn = base["profile"]["ops"].get("attention", {}).get("device_ms", 0.0)
    r = tokens / base["tokens"]
    return (r * (base["ms"] - attn) + r * r * attn) / 1e3


# -- the peer -----------------------------------------------------------------------------------
def run_peer(args: argparse.Namespace, dev: Device, cfg: dict, out: dict, clock: Clock,
             save: Callable[[], None]) -> None:  # fmt: skip
    import hf_peer

    t0 = time.perf_counter()
    model = hf_peer.load(cfg, "cuda" if dev.gpu else "cpu")
    peer = out["peer"] = {**hf_peer.describe(model), "load_s": time.perf_counter() - t0,
                          "prefill_ms": {}, "decode_ms": {}, "compiled_decode_ms": {}}  # fmt: skip
    print(f"transformers model built in {peer['load_s']:.1f} s: {peer}", flush=True)
    save()
    for tokens in sorted(args.prefill):
        if clock.left() < 30:
            out["skipped"].append(f"peer prefill {tokens}: out of time")
            continue
        with section(out, f"peer prefill {tokens}"):
            one = tokens <= args.chunk
            runs = hf_peer.prefill_ms(
                model, tokens, 1 if one else 0, args.prefill_repeat if one else 1
            )
            peer["prefill_ms"][str(tokens)] = {"ms": statistics.median(runs), "runs_ms": runs}
            print(f"peer prefill {tokens}: {statistics.median(runs):.1f} ms", flush=True)
            save()
    first = [b for b in (1, 32) if b in args.decode_batches]
    for b in first + [b for b in args.decode_batches if b not in first]:
        if clock.left() < 30:
            out["skipped"].append(f"peer decode batch {b}: out of time")
            continue
        with section(out, f"peer decode batch {b}"):
            runs = hf_peer.decode_ms(model, b, args.context, args.warmup, args.peer_repeat)
            peer["decode_ms"][str(b)] = {"ms": statistics.median(runs), "runs_ms": runs}
            print(f"peer decode batch {b}: {statistics.median(runs):.2f} ms", flush=True)
            save()
    for b in first if args.hf_compile else []:
        if clock.left() < args.hf_compile_min_s:
            out["skipped"].append(
                f"peer compiled decode batch {b}: {clock.left():.0f} s of budget left"
            )
            continue
        with section(out, f"peer compiled decode batch {b}"):
            t0 = time.perf_counter()
            ms = hf_peer.compiled_decode_ms(model, b, args.context)
            peer["compiled_decode_ms"][str(b)] = {"ms": ms, "wall_s": time.perf_counter() - t0}
            print(f"peer compiled decode batch {b}: {ms:.2f} ms", flush=True)
            save()
    del model
    hf_peer.empty_cache()


# -- report -------------------------------------------------------------------------------------
class Clock:
    """Seconds left of the run's budget."""

    def __init__(self, budget_s: float) -> None:
        self.end = time.perf_counter() + budget_s

    def left(self) -> float:
        return self.end - time.perf_counter()


@contextlib.contextmanager
def section(out: dict, name: str) -> Iterator[None]:
    """Run one measurement; a failure is recorded in the results and the next one runs."""
    try:
        yield
    except Exception as e:
        traceback.print_exc()
        out["errors"].append(f"{name}: {type(e).__name__}: {e}")


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", choices=("cupy", "numpy"), default="cupy")
    p.add_argument("--tiny", action="store_true", help="the tiny model's shapes (smoke test)")
    p.add_argument("--decode-batches", type=_ints, help="default 1,8,32,64,128")
    p.add_argument("--context", type=int, help="tokens in cache per decoding sequence (1024)")
    p.add_argument("--prefill", type=_ints, help="prompt lengths, default 1024,8192,32768")
    p.add_argument("--chunk", type=int, help="tokens per prefill pass (8192)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs before each figure")
    p.add_argument("--repeat", type=int, default=10, help="timed decode steps per batch")
    p.add_argument("--prefill-repeat", type=int, default=3, help="timed single-pass prefills")
    p.add_argument("--peer-repeat", type=int, default=5, help="timed peer decode steps")
    p.add_argument("--window", type=int, default=8, help="layers timed per profile pass")
    p.add_argument("--copy-mb", type=int, help="device copy size for the bandwidth (4096)")
    p.add_argument("--gemm-n", type=int, help="GEMM size for the bf16 rate (8192)")
    p.add_argument("--budget-s", type=float, default=420, help="stop starting new figures after")
    p.add_argument("--peer-reserve-s", type=float, default=150, help="budget kept for the peer")
    p.add_argument(
        "--max-extrapolated-s",
        type=float,
        default=90,
        help="skip a chunked prefill predicted to take longer",
    )
    p.add_argument("--no-peer", action="store_true", help="skip transformers")
    p.add_argument("--no-graphs", dest="graphs", action="store_false", help="skip CUDA graphs")
    p.add_argument("--max-model-len", type=int, default=4096,
                   help="tokens the decode graphs' block tables hold")  # fmt: skip
    p.add_argument("--no-hf-compile", dest="hf_compile", action="store_false")
    p.add_argument(
        "--hf-compile-min-s",
        type=float,
        default=180,
        help="budget a compiled peer run needs left to start",
    )
    p.add_argument("--json", "--out", type=Path, default=DEFAULT_JSON, help="results file")
    p.add_argument("--report", type=Path, help="print the tables of a results file and exit")
    args = p.parse_args(argv)
    if args.report:
        print_tables(json.loads(args.report.read_text()))
        return
    small = dict(
        decode_batches=[1, 4, 16], context=48, prefill=[64, 256], chunk=128, copy_mb=16, gemm_n=256
    )
    full = dict(
        decode_batches=[1, 8, 32, 64, 128],
        context=1024,
        prefill=[1024, 8192, 32768],
        chunk=8192,
        copy_mb=4096,
        gemm_n=8192,
    )
    for k, v in (small if args.tiny else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if min(args.decode_batches + args.prefill + [args.context, args.chunk, args.repeat]) < 1:
        p.error("batches, lengths, --context, --chunk and --repeat must be >= 1")
    cfg = dict(TINY_CONFIG) if args.tiny else FULL_CONFIG
    clock = Clock(args.budget_s)
    dev = Device(args.backend)
    out: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {**dev.describe(), "python": sys.version.split()[0]},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "config": cfg,
        "decode": [],
        "prefill": [],
        "skipped": [],
        "errors": [],
    }

    def save() -> None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))

    with section(out, "ours"):
        run_ours(args, dev, cfg, out, clock, save)
    dev.free()
    save()
    if not args.no_peer:
        with section(out, "peer"):
            run_peer(args, dev, cfg, out, clock, save)
    save()
    print_tables(out)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
