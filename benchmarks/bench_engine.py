"""Engine step times on one GPU at ERNIE-4.5-21B-A3B's full shapes, random bf16 weights.

Measured in one run:
  decode    one `ModelRunner.execute` step, one new token per sequence, every sequence with
            --context tokens already in the KV cache, at each batch of --decode-batches;
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
warmup. The engine builds no CUDA graphs yet: its `graphs` column reads n/a.

    python benchmarks/bench_engine.py [--json benchmarks/results/bench_engine.json]
    python benchmarks/bench_engine.py --tiny --backend numpy   # smoke test of the script on a CPU
    python benchmarks/bench_engine.py --report benchmarks/results/bench_engine.json   # tables
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pdserve.backends.base import Ops
from pdserve.config import ModelConfig
from pdserve.engine.model_runner import ModelRunner, SeqChunk
from pdserve.model.ernie45_moe import ErnieMoeForCausalLM, ErnieMoeSparseBlock
from pdserve.model.forward_batch import ForwardBatch
from pdserve.model.tiny import TINY_CONFIG
from pdserve.model.weights import LayerWeights, MLPWeights, ModelWeights, MoEWeights

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
STD = 0.02
BLOCK = 64  # tokens per KV block, the engine's default
TARGETS_MS = {("decode", 1): 2.2, ("decode", 32): 12.0, ("prefill", 8192): 160.0}
_CHUNK = 1 << 28  # elements drawn per call when filling big arrays
_SPIN = r"""
extern "C" __global__ void spin(unsigned long long ns) {
  unsigned long long t0, t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  do {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  } while (t - t0 < ns);
}
"""


class _HostEvent:
    """A CUDA event's stand-in on the CPU backend: the host clock when recorded."""

    t = 0.0

    def record(self) -> None:
        self.t = time.perf_counter()


class Device:
    """What the benchmark needs beyond `Ops`: random arrays drawn where the model runs,
    synchronisation, events, and a kernel that holds the GPU for a while."""

    def __init__(self, backend: str) -> None:
        self.gpu = backend == "cupy"
        self.rng = np.random.default_rng(0)
        if self.gpu:
            import cupy as cp

            from pdserve.backends.cupy_kernels import BF16

            self.xp, self.dtype = cp, BF16
            self._spin = cp.RawKernel(_SPIN, "spin")
        else:
            self.xp, self.dtype = np, np.dtype(np.float32)

    def sync(self) -> None:
        if self.gpu:
            self.xp.cuda.get_current_stream().synchronize()

    def event(self) -> Any:
        return self.xp.cuda.Event() if self.gpu else _HostEvent()

    def elapsed_ms(self, start: Any, end: Any) -> float:
        if self.gpu:
            return float(self.xp.cuda.get_elapsed_time(start, end))
        return (end.t - start.t) * 1e3

    def spin(self, seconds: float) -> None:
        if self.gpu:
            self._spin((1,), (1,), (np.uint64(int(seconds * 1e9)),))

    def randn(self, shape: tuple[int, ...], std: float = 1.0, fp32: bool = False) -> Any:
        """Normal(0, std): float32 if asked, else the weight dtype (bf16 on the GPU)."""
        if fp32 and self.gpu:
            return self.xp.random.standard_normal(shape, dtype=np.float32) * np.float32(std)
        out = self.xp.empty(shape, dtype=np.float32 if fp32 else self.dtype)
        self.fill_randn(out, std)
        return out

    def fill_randn(self, arr: Any, std: float = 1.0) -> None:
        """Overwrite the contiguous `arr` with Normal(0, std) values (bf16: float32 truncated)."""
        if not self.gpu:
            arr[...] = self.rng.standard_normal(arr.shape, dtype=np.float32) * np.float32(std)
            return
        cp = self.xp
        flat = arr.view(cp.uint16).reshape(-1)
        for a in range(0, flat.size, _CHUNK):
            f = cp.random.standard_normal(min(_CHUNK, flat.size - a), dtype=cp.float32)
            f *= np.float32(std)
            flat[a : a + f.size] = (f.view(cp.uint32) >> 16).astype(cp.uint16)

    def ones(self, n: int) -> Any:
        if not self.gpu:
            return np.ones(n, np.float32)
        return self.xp.full(n, 0x3F80, dtype=self.xp.uint16).view(self.dtype)  # bf16 1.0

    def free(self) -> None:
        gc.collect()
        if self.gpu:
            self.xp.get_default_memory_pool().free_all_blocks()

    def describe(self) -> dict[str, Any]:
        if not self.gpu:
            return {"device": platform.processor() or platform.machine(), "backend": "numpy"}
        cp = self.xp
        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
        name = props["name"]
        return {
            "device": name.decode() if isinstance(name, bytes) else str(name),
            "memory_bytes": int(props["totalGlobalMem"]),
            "sms": int(props["multiProcessorCount"]),
            "cupy": cp.__version__,
            "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(),
            "backend": "cupy",
        }


def make_ops(dev: Device) -> Ops:
    """The backend's ops, taking weights that already live on the device as they are."""
    if not dev.gpu:
        from pdserve.backends.numpy_ops import NumpyOps

        return NumpyOps()
    from pdserve.backends.cupy_ops import CupyLinear, CupyOps

    class DeviceWeightOps(CupyOps):
        def weight(self, host: Any, fp32: bool = False) -> Any:
            return host if isinstance(host, dev.xp.ndarray) else super().weight(host, fp32)

        def linear_weight(self, host: Any, quantization: str | None) -> Any:
            if isinstance(host, dev.xp.ndarray) and quantization is None:
                return CupyLinear(host)
            return super().linear_weight(host, quantization)

    return DeviceWeightOps()


def random_weights(dev: Device, c: ModelConfig) -> ModelWeights:
    h = c.hidden_size

    def mlp(inter: int) -> MLPWeights:
        return MLPWeights(gate_up=dev.randn((2 * inter, h), STD), down=dev.randn((h, inter), STD))

    layers = []
    for i in range(c.num_hidden_layers):
        e, inter = c.moe_num_experts, c.moe_intermediate_size
        ffn: MLPWeights | MoEWeights
        if c.is_moe_layer(i):
            shared = mlp(c.shared_intermediate_size) if c.moe_num_shared_experts else None
            ffn = MoEWeights(router=dev.randn((e, h), STD, fp32=True),
                             correction_bias=dev.xp.zeros(e, np.float32),
                             gate_up=dev.randn((e, 2 * inter, h), STD),
                             down=dev.randn((e, h, inter), STD), shared=shared)  # fmt: skip
        else:
            ffn = mlp(c.intermediate_size)
        qkv = dev.randn((c.q_size + 2 * c.kv_size, h), STD)
        layers.append(
            LayerWeights(
                input_norm=dev.ones(h),
                post_attention_norm=dev.ones(h),
                qkv=qkv,
                o=dev.randn((h, c.q_size), STD),
                mlp=ffn,
            )
        )
    embed = dev.randn((c.vocab_size, h), STD)
    lm_head = embed if c.tie_word_embeddings else dev.randn((c.vocab_size, h), STD)
    return ModelWeights(embed=embed, layers=layers, norm=dev.ones(h), lm_head=lm_head)


# -- floors -------------------------------------------------------------------------------------
def kv_bytes_per_token(c: ModelConfig) -> int:
    return c.num_hidden_layers * 2 * c.kv_size * 2


def active_params(c: ModelConfig) -> int:
    """Linear weights one token multiplies (router and k experts per MoE layer), lm_head not."""
    h, n = c.hidden_size, 0
    for i in range(c.num_hidden_layers):
        n += (c.q_size + 2 * c.kv_size) * h + h * c.q_size
        if c.is_moe_layer(i):
            n += c.moe_num_experts * h
            n += 3 * h * (c.shared_intermediate_size + c.moe_k * c.moe_intermediate_size)
        else:
            n += 3 * h * c.intermediate_size
    return n


def weight_bytes(c: ModelConfig, touched: list[int], tokens: int) -> int:
    """Bytes of weights one pass reads: bf16 linears, float32 router, `touched[j]` experts of
    the j-th MoE layer, the lm_head and the embedding rows of `tokens` tokens."""
    h, n, moe = c.hidden_size, 0, iter(touched)
    for i in range(c.num_hidden_layers):
        n += 2 * (2 * h + (c.q_size + 2 * c.kv_size) * h + h * c.q_size)
        if c.is_moe_layer(i):
            n += 4 * c.moe_num_experts * (h + 1)
            n += 2 * 3 * h * (c.shared_intermediate_size + next(moe) * c.moe_intermediate_size)
        else:
            n += 2 * 3 * h * c.intermediate_size
    return n + 2 * h * (1 + c.vocab_size + tokens)


def attention_flops(c: ModelConfig, keys_seen: int) -> int:
    """QK^T and PV over all layers, summed over the keys each query sees."""
    return 4 * c.q_size * c.num_hidden_layers * keys_seen


def decode_floor(c: ModelConfig, batch: int, context: int, touched: list[int]) -> dict:
    nbytes = weight_bytes(c, touched, batch) + batch * (context + 2) * kv_bytes_per_token(c)
    flops = batch * (2 * active_params(c) + 2 * c.vocab_size * c.hidden_size)
    return {"bytes": nbytes, "flops": flops + attention_flops(c, batch * (context + 1))}


def prefill_floor(c: ModelConfig, tokens: int, passes: int, touched: list[int]) -> dict:
    nbytes = weight_bytes(c, touched, tokens) + tokens * kv_bytes_per_token(c)
    flops = tokens * 2 * active_params(c) + passes * 2 * c.vocab_size * c.hidden_size
    return {"bytes": nbytes, "flops": flops + attention_flops(c, tokens * (tokens + 1) // 2)}


def add_floor(row: dict, floor: dict, ceilings: dict) -> None:
    bytes_ms = floor["bytes"] / ceilings["copy_bytes_per_s"] * 1e3
    flops_ms = floor["flops"] / ceilings["gemm_flops_per_s"] * 1e3
    row.update(floor, bytes_ms=bytes_ms, flops_ms=flops_ms, floor_ms=max(bytes_ms, flops_ms))
    row["x_floor"] = row["ms"] / row["floor_ms"]
    if "graph_ms" in row:
        row["x_floor_graph"] = row["graph_ms"] / row["floor_ms"]


def measure_ceilings(dev: Device, ops: Ops, copy_bytes: int, n: int) -> dict:
    """Device copy bandwidth (read + write) and the bf16 GEMM rate through `ops.linear`."""

    def device_ms(fn: Callable[[], object], warmup: int = 3, repeat: int = 10) -> float:
        for _ in range(warmup):
            fn()
        runs = []
        for _ in range(repeat):
            a, b = dev.event(), dev.event()
            a.record()
            fn()
            b.record()
            dev.sync()
            runs.append(dev.elapsed_ms(a, b))
        return statistics.median(runs)

    src = dev.randn((copy_bytes // 2,))
    copy_bytes = src.nbytes
    src = src.view(np.uint16)  # a plain copy, whatever CuPy thinks of bf16
    dst = dev.xp.empty_like(src)
    copy_ms = device_ms(lambda: dev.xp.copyto(dst, src))
    x, w = dev.randn((n, n)), ops.linear_weight(dev.randn((n, n)), None)
    gemm_ms = device_ms(lambda: ops.linear(x, w))
    return {
        "copy_bytes": copy_bytes,
        "copy_ms": copy_ms,
        "copy_bytes_per_s": 2 * copy_bytes / (copy_ms / 1e3),
        "gemm_n": n,
        "gemm_ms": gemm_ms,
        "gemm_flops_per_s": 2 * n**3 / (gemm_ms / 1e3),
    }


# -- profile ------------------------------------------------------------------------------------
OP_CATEGORY = {
    "embedding": "embedding", "rms_norm": "norm", "add_rms_norm": "norm",
    "rope": "rope + kv write", "write_kv": "rope + kv write", "rope_write_kv": "rope + kv write",
    "paged_attention": "attention",
    "silu_mul": "silu_mul", "moe_route": "moe_route", "moe_experts": "moe_experts",
    "linear": "linear",
}  # fmt: skip


class OpProfiler:
    """Times each `ops` call of one forward pass on the device, by category.

    A spin kernel first holds the GPU long enough for the host to queue the layers measured,
    so each pair of events brackets the op's kernels and no launch gap. CUDA queues about a
    thousand launches per stream before the host blocks, so one pass puts events in only
    `window` layers (the part after the last layer counts as one more); passes cover them all.
    The first pass keeps the expert ids of every MoE layer, to count the experts touched."""

    def __init__(self, dev: Device, ops: Ops, model: ErnieMoeForCausalLM) -> None:
        self.dev, self.ops, self.model = dev, ops, model
        names: dict[int, str] = {id(model.lm_head): "lm_head"}
        for layer in model.layers:
            names[id(layer.self_attn.qkv)] = "qkv_proj"
            names[id(layer.self_attn.o)] = "o_proj"
            mlp, kind = layer.mlp, "dense_mlp linears"
            if isinstance(mlp, ErnieMoeSparseBlock):
                mlp, kind = mlp.shared, "shared_expert linears"
            if mlp is not None:
                names[id(mlp.gate_up)] = names[id(mlp.down)] = kind
        self.linears = names
        self.records: list[tuple[str, Any, Any, float]] = []
        self.ids: list[Any] = []
        self.layer = self.lo = self.hi = self.depth = 0
        self.keep_ids = False
        self.last_host = 0.0

    def _wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if name == "moe_experts" and self.keep_ids and not self.depth:
                self.ids.append(args[2])
            if self.depth or not self.lo <= self.layer < self.hi:  # NumpyOps nests ops
                return fn(*args, **kwargs)
            cat = self.linears.get(id(args[1]), "linear") if name == "linear" else OP_CATEGORY[name]
            start, end = self.dev.event(), self.dev.event()
            start.record()
            t0 = time.perf_counter()
            self.depth += 1
            try:
                out = fn(*args, **kwargs)
            finally:
                self.depth -= 1
            self.last_host = time.perf_counter()
            end.record()
            self.records.append((cat, start, end, self.last_host - t0))
            return out

        return timed

    def _after_layer(self, i: int) -> None:
        self.layer = i + 1

    def run(self, batch: ForwardBatch, kv_cache: Any, spin_s: float, window: int) -> dict:
        ops: dict[str, dict] = {}
        busy = between = 0.0
        ahead = True
        for name in OP_CATEGORY:
            setattr(self.ops, name, self._wrap(name, getattr(self.ops, name)))
        batch.after_layer = self._after_layer
        try:
            for lo in range(0, len(self.model.layers) + 1, window):
                self.lo, self.hi, self.layer, self.keep_ids = lo, lo + window, 0, lo == 0
                self.records = []
                self.dev.sync()
                a, b = self.dev.event(), self.dev.event()
                a.record()
                self.dev.spin(spin_s)
                b.record()
                t0 = time.perf_counter()
                self.model.forward(batch, kv_cache)
                self.dev.sync()
                ahead &= (self.last_host - t0) * 1e3 < self.dev.elapsed_ms(a, b)
                span = self.dev.elapsed_ms(self.records[0][1], self.records[-1][2])
                busy += span
                between += span
                for cat, start, end, host_s in self.records:
                    ms = self.dev.elapsed_ms(start, end)
                    between -= ms
                    o = ops.setdefault(cat, {"device_ms": 0.0, "host_ms": 0.0, "calls": 0})
                    o["device_ms"] += ms
                    o["host_ms"] += host_s * 1e3
                    o["calls"] += 1
        finally:
            for name in OP_CATEGORY:
                delattr(self.ops, name)
            batch.after_layer = None
            self.records = []
        touched = [int(self.dev.xp.unique(ids).size) for ids in self.ids]
        self.ids = []
        ops = dict(sorted(ops.items(), key=lambda kv: -kv[1]["device_ms"]))
        return {"busy_ms": busy, "between_ops_ms": between, "gpu_ahead": ahead and self.dev.gpu,
                "spin_s": spin_s, "window_layers": window, "ops": ops,
                "experts_touched": touched}  # fmt: skip


# -- our engine ---------------------------------------------------------------------------------
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


def step_row(runs: list[float], logits: Any) -> dict:
    return {
        "ms": statistics.median(runs),
        "runs_ms": runs,
        "logits_finite": bool(np.isfinite(logits).all()),
    }


def profile_row(row: dict, prof: OpProfiler, runner: ModelRunner, chunks: list[SeqChunk],
                dev: Device, repeat: int, window: int) -> list[int]:  # fmt: skip
    """Adds the forward's host time (until `forward` returns, unsynchronised: the cost of
    queueing it, or more where the launch queue fills) and its op profile to `row`; returns
    the experts each MoE layer touched. A prefill keeps the GPU busy without the spin's help,
    so it is profiled in one pass (`window` = all layers)."""
    batch = runner.on_device(runner.build_batch(chunks))
    host = []
    for _ in range(repeat):
        dev.sync()
        t0 = time.perf_counter()
        runner.model.forward(batch, runner.kv_cache)
        host.append(time.perf_counter() - t0)
    dev.sync()
    host_s = statistics.median(host)
    profile = prof.run(batch, runner.kv_cache, min(0.5, 2 * host_s + 0.005), window)
    touched = profile.pop("experts_touched")
    row.update(
        host_ms=host_s * 1e3,
        busy_ms=profile["busy_ms"],
        profile=profile,
        experts_touched_mean=float(np.mean(touched)) if touched else 0.0,
        experts_touched_per_layer=touched,
    )
    return touched


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
            chunks = [
                SeqChunk(
                    rng.integers(3, c.vocab_size, args.context + 1).tolist(),
                    args.context,
                    1,
                    list(range(s * per_seq, (s + 1) * per_seq)),
                )
                for s in range(b)
            ]
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
def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


DECODE_HEAD = ("batch", "ours", "host", "busy", "graphs", "floor", "x.floor", "GB", "experts",
               "hf.eager", "hf.graph", "hf/ours", "target")  # fmt: skip
PREFILL_HEAD = ("tokens", "passes", "ours", "host", "busy", "floor", "x.floor", "TFLOP",
                "hf.eager", "hf/ours", "target")  # fmt: skip


def _line(cells: list[str] | tuple[str, ...]) -> str:
    return "".join(f"{x:>9}" for x in cells)


def print_tables(out: dict) -> None:
    peer = out.get("peer") or {}
    if ceil := out.get("ceilings"):
        print(f"\nceilings: copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write), "
              f"bf16 GEMM {ceil['gemm_flops_per_s'] / 1e12:.0f} TFLOP/s; "
              "floor = max(bytes / copy, FLOPs / GEMM)")  # fmt: skip
    print(f"\ndecode, one token per sequence over {out['args']['context']} tokens of context, "
          "ms per step (median, greedy sampling included); ours: eager, graphs: CUDA graphs "
          f"(block tables sized for {out['args'].get('max_model_len')} tokens)")  # fmt: skip
    print(_line(DECODE_HEAD))
    for r in out["decode"]:
        hf = peer.get("decode_ms", {}).get(str(r["batch"]), {}).get("ms")
        hfc = peer.get("compiled_decode_ms", {}).get(str(r["batch"]), {}).get("ms")
        best = min(r["ms"], r.get("graph_ms", r["ms"]))
        print(_line((str(r["batch"]), _f(r["ms"]), _f(r.get("host_ms")), _f(r.get("busy_ms")),
                     _f(r.get("graph_ms")), _f(r["floor_ms"]), _f(best / r["floor_ms"], 1),
                     _f(r["bytes"] / 1e9, 1), _f(r.get("experts_touched_mean"), 1), _f(hf),
                     _f(hfc), _f(hf / best if hf else None),
                     _f(TARGETS_MS.get(("decode", r["batch"])), 1))))  # fmt: skip
    print(f"\nprefill of one sequence, passes of at most {out['args']['chunk']} tokens, ms")
    print(_line(PREFILL_HEAD))
    for r in out["prefill"]:
        hf = peer.get("prefill_ms", {}).get(str(r["tokens"]), {}).get("ms")
        print(_line((str(r["tokens"]), str(r["passes"]), _f(r["ms"], 1), _f(r.get("host_ms"), 1),
                     _f(r.get("busy_ms"), 1), _f(r["floor_ms"], 1), _f(r["x_floor"], 1),
                     _f(r["flops"] / 1e12, 1), _f(hf, 1), _f(hf / r["ms"] if hf else None),
                     _f(TARGETS_MS.get(("prefill", r["tokens"])), 1))))  # fmt: skip
    print_profiles(out)
    for note in out["skipped"] + out["errors"]:
        print(f"not measured: {note}")


def print_profiles(out: dict) -> None:
    """Decode at batch 1 and 32 and the longest profiled prefill, side by side."""
    rows = [(f"decode b{r['batch']}", r) for r in out["decode"] if r["batch"] in (1, 32)]
    prefills = [r for r in out["prefill"] if "profile" in r]
    if prefills:
        r = max(prefills, key=lambda r: r["tokens"])
        rows.append((f"prefill {r['tokens']}", r))
    if not rows:
        return
    print("\nprofile: device ms per forward by op (events around each op, the GPU held until "
          "the host queued it), % of busy, host ms queueing it (- where the host had to wait "
          "for the launch queue)")  # fmt: skip
    cats: list[str] = []
    for _, r in rows:
        cats += [k for k in r["profile"]["ops"] if k not in cats]
    print(f"{'op':<22}" + "".join(f"{name + ' ms':>16}{'%':>6}{'host':>8}" for name, _ in rows))
    for cat in [*cats, "(between ops)", "busy total"]:
        line = f"{cat:<22}"
        for _, r in rows:
            p = r["profile"]
            o = p["ops"].get(cat, {})
            ms = {"(between ops)": p["between_ops_ms"], "busy total": p["busy_ms"]}.get(
                cat, o.get("device_ms", 0.0))  # fmt: skip
            host = o.get("host_ms") if p["gpu_ahead"] else None  # else it includes waits
            line += f"{ms:>16.3f}{100 * ms / p['busy_ms']:>6.1f}{_f(host):>8}"
        print(line)


# -- main ---------------------------------------------------------------------------------------
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
