"""Per-op device time of one forward pass, by category (bench_engine.py's profile)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from engine_device import Device

from pdserve.backends.base import Ops
from pdserve.engine.model_runner import ModelRunner, SeqChunk
from pdserve.model.ernie45_moe import ErnieMoeForCausalLM, ErnieMoeSparseBlock
from pdserve.model.forward_batch import ForwardBatch

OP_CATEGORY = {
    "embedding": "embedding", "rms_norm": "norm", "add_rms_norm": "norm",
    "rope": "rope + kv write", "write_kv": "rope + kv write", "rope_write_kv": "rope + kv write",
    "qkv_rope_write_kv": "qkv + rope + kv write",
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
