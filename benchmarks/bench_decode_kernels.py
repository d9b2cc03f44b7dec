"""Decode weight-streaming kernels on one GPU at ERNIE-4.5-21B-A3B's shapes, against the bytes
floor (the weight bytes an op must read over 4.2 TB/s, the H200's measured copy bandwidth; the
copy is measured again at the start and reported beside it).

  dense  each linear of a decode step (qkv, o, shared experts' gate_up and down, layer 0's
         dense gate_up and down, lm_head) at T = 1, 8, 32: our GEMV (cupy_gemv.gemv), cuBLAS
         (cupy_kernels.gemm) for the crossover, and the GEMV replayed from a CUDA graph;
         `--sweep` adds the GEMV at T = 1 over warps per block for the small shapes;
  moe    one MoE layer (route + experts, 64 experts of 1536, top-6, random routing, and the
         two shared experts, one MLP of 3072) at T = 1, 8, 32, 128: the decode path as a whole
         (the shared experts on the side stream, forked before the routing, as CupyOps.moe runs
         them), as a CUDA graph, and kernel by kernel (the shared experts in line); the older
         path (GEMV per (token, expert) pair, with the shared experts as two GEMVs, SiLU-mul and
         an add) for reference. The floor
         counts the experts the router really picked, per layer, and the shared experts.

Timing: a spin kernel holds the GPU while the host queues the launches, so CUDA events time
kernels back to back, gaps included (about what a graph node costs); the launches rotate over
copies of the weights that together exceed 4x the L2, so every launch reads DRAM as in a real
step. Figures are the median of 3 rounds, in microseconds per launch.

    python benchmarks/bench_decode_kernels.py [--json benchmarks/results/bench_decode_kernels.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import cupy as cp
import numpy as np

from pdserve.backends import cupy_gemv, cupy_moe
from pdserve.backends.cupy_kernels import BF16, Kernels, Pending, compiled, gemm, row_major

BANDWIDTH = 4.2e12  # bytes/s: the floor's copy bandwidth (DESIGN.md 5a)
H, I_MOE, E, TOP_K = 2560, 1536, 64, 6
DENSE = [  # name, out features, in features, float32 output
    ("qkv", 3584, 2560, False), ("o", 2560, 2560, False),
    ("shared_gate_up", 6144, 2560, False), ("shared_down", 2560, 3072, False),
    ("dense_gate_up", 24576, 2560, False), ("dense_down", 2560, 12288, False),
    ("lm_head", 103424, 2560, True),
]  # fmt: skip
_SPIN = r"""
extern "C" __global__ void spin(unsigned long long ns) {
  unsigned long long t0, t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while (t - t0 < ns);
}
"""


class Timer:
    """Device microseconds per launch: the host queues `n` launches behind a spin kernel, CUDA
    events bracket them. The spin is lengthened until it outlasts the queueing."""

    def __init__(self) -> None:
        self.spin = cp.RawKernel(_SPIN, "spin")
        self.host_us_per_launch = 40.0

    def per_launch_us(self, launch: Callable[[int], object], n: int, rounds: int = 3) -> float:
        launch(0)  # compile, allocate
        cp.cuda.Device().synchronize()
        runs = []
        while len(runs) < rounds:
            spin_ns = int(n * self.host_us_per_launch * 1e3 + 2e6)
            self.spin((1,), (1,), (np.uint64(spin_ns),))
            a, b = cp.cuda.Event(), cp.cuda.Event()
            a.record()
            for i in range(n):
                launch(i)
            b.record()
            if a.done:  # the GPU waited for the host: queueing took longer than the spin
                b.synchronize()
                self.host_us_per_launch *= 2
                continue
            b.synchronize()
            runs.append(cp.cuda.get_elapsed_time(a, b) * 1e3 / n)
        return statistics.median(runs)

    def graph_us(self, launch: Callable[[int], object], n: int) -> float:
        """The same launches captured as one CUDA graph, replayed: microseconds per launch."""
        launch(0)
        stream = cp.cuda.Stream(non_blocking=True)
        pool = cp.cuda.MemoryPool()  # what the capture allocates stays the graph's
        with cp.cuda.using_allocator(pool.malloc), stream:
            for i in range(n):  # an eager pass in the pool caches the blocks the capture takes
                launch(i)
            stream.synchronize()
            stream.begin_capture()
            for i in range(n):
                launch(i)
            graph = stream.end_capture()
            graph.launch(stream)
            runs = []
            for _ in range(3):
                a, b = cp.cuda.Event(), cp.cuda.Event()
                a.record(stream)
                graph.launch(stream)
                b.record(stream)
                b.synchronize()
                runs.append(cp.cuda.get_elapsed_time(a, b) * 1e3 / n)
        return statistics.median(runs)


def randn_bf16(shape: tuple[int, ...], std: float) -> cp.ndarray:
    """Normal(0, std) as bf16 (float32 truncated), drawn on the device."""
    f = cp.random.standard_normal(shape, dtype=cp.float32) * np.float32(std)
    return (f.view(cp.uint32) >> 16).astype(cp.uint16).view(BF16)


def copies_for(nbytes: int) -> int:
    l2 = cp.cuda.Device().attributes["L2CacheSize"]
    return max(1, min(64, -(-4 * l2 // nbytes)))


def launches_for(floor_us: float, copies: int) -> int:
    """Enough launches for about 2 ms of device time, a whole number of rotations."""
    n = max(copies, int(2000 / max(floor_us, 1.0)))
    return min(400, -(-n // copies) * copies)


def row(section: str, name: str, t: int, impl: str, us: float, nbytes: float, **extra) -> dict:
    gbps = nbytes / (us * 1e-6) / 1e9
    out = {"section": section, "name": name, "tokens": t, "impl": impl, "us": round(us, 2),
           "bytes": int(nbytes), "gb_per_s": round(gbps, 1),
           "pct_of_4_2": round(100 * gbps * 1e9 / BANDWIDTH, 1)}  # fmt: skip
    out.update(extra)
    print(f"{section:6} {name:16} T={t:<4} {impl:18} {us:9.2f} us {gbps:8.1f} GB/s "
          f"{out['pct_of_4_2']:6.1f} %", " ".join(f"{k}={v}" for k, v in extra.items()),
          flush=True)  # fmt: skip
    return out


def rotating(fn: Callable[..., object], ws: list, *args: object) -> Callable[[int], object]:
    """Launch i runs fn(ws[i % len(ws)], *args): each launch reads another copy."""
    return lambda i: fn(ws[i % len(ws)], *args)


def ours(w: cp.ndarray, k: Kernels, x: cp.ndarray, out_dtype: np.dtype,
         warps: int | None = None) -> cp.ndarray:  # fmt: skip
    return cupy_gemv.gemv(k, x, w, out_dtype, warps)


def blas(w: cp.ndarray, k: Kernels, x: cp.ndarray, out_dtype: np.dtype) -> cp.ndarray:
    return gemm(k, x, w, out_dtype)


def bench_dense(timer: Timer, k: Kernels, tokens: list[int], sweep: bool) -> list[dict]:
    rows = []
    for name, n, kdim, f32 in DENSE:
        nbytes = n * kdim * 2
        copies = copies_for(nbytes)
        ws = [randn_bf16((n, kdim), 0.02) for _ in range(copies)]
        out_dtype = np.dtype(np.float32) if f32 else BF16
        nl = launches_for(nbytes / BANDWIDTH * 1e6, copies)
        for t in tokens:
            x = randn_bf16((t, kdim), 1.0)
            us = timer.per_launch_us(rotating(ours, ws, k, x, out_dtype), nl)
            graph = timer.graph_us(rotating(ours, ws, k, x, out_dtype), nl)
            warps, _ = cupy_gemv.plan(k, n, kdim)
            rows.append(row("dense", name, t, "gemv", us, nbytes, graph_us=round(graph, 2),
                            warps=warps, copies=copies))  # fmt: skip
            us = timer.per_launch_us(rotating(blas, ws, k, x, out_dtype), nl)
            rows.append(row("dense", name, t, "cublas", us, nbytes))
            if sweep and t == 1 and name != "lm_head":
                for warps in (1, 2, 4, 6, 8, 10, 12, 16):
                    us = timer.per_launch_us(rotating(ours, ws, k, x, out_dtype, warps), nl)
                    rows.append(row("sweep", name, 1, f"gemv warps={warps}", us, nbytes))
        del ws
        cp.get_default_memory_pool().free_all_blocks()
    return rows


class MoELayers:
    """`copies` MoE layers of full size, each with its own router and input, so that routing
    and weights change from launch to launch."""

    def __init__(self, k: Kernels, copies: int, max_tokens: int) -> None:
        self.k, self.copies = k, copies
        self.gate_up = [randn_bf16((E, 2 * I_MOE, H), 0.02) for _ in range(copies)]
        self.down = [randn_bf16((E, H, I_MOE), 0.02) for _ in range(copies)]
        self.shared = [(randn_bf16((4 * I_MOE, H), 0.02), randn_bf16((H, 2 * I_MOE), 0.02))
                       for _ in range(copies)]  # fmt: skip
        self.router = [cp.random.standard_normal((E, H), dtype=cp.float32) * np.float32(0.02)
                       for _ in range(copies)]  # fmt: skip
        self.bias = cp.zeros((E,), cp.float32)
        self.inputs = [randn_bf16((max_tokens, H), 1.0) for _ in range(copies)]
        self.x = self.inputs

    def use_tokens(self, t: int) -> float:
        """Take the first t tokens of each input; the mean number of experts a layer picks."""
        self.x = [row_major(x[:t]) for x in self.inputs]
        counts = [len(np.unique(cp.asnumpy(self.route(j)[1]))) for j in range(self.copies)]
        return float(np.mean(counts))

    def shared_side(self, i: int, token_tiles: int | None = None) -> Pending:
        """Layer i's shared experts, started on the side stream (as CupyOps.moe does)."""
        j = i % self.copies
        return self.k.on_side(cupy_moe.shared_experts, self.k, self.x[j], I_MOE,
                              *self.shared[j], None, token_tiles)  # fmt: skip

    def route(self, i: int) -> tuple[cp.ndarray, cp.ndarray]:
        j = i % self.copies
        return cupy_moe.moe_route(self.k, self.x[j], self.router[j], self.bias, TOP_K, 1e-12)


def bench_moe(timer: Timer, k: Kernels, tokens: list[int], sweep: bool) -> list[dict]:
    rows = []
    expert_bytes = 3 * I_MOE * H * 2
    layers = MoELayers(k, 3, max(tokens))
    for t in tokens:
        touched = layers.use_tokens(t)
        nbytes = (touched + 2) * expert_bytes + E * H * 4
        floor_us = nbytes / BANDWIDTH * 1e6
        nl = 3 * max(1, min(100, int(3000 / floor_us) // 3))
        extra = {"experts": round(touched, 1)}

        def layer(i: int, path: str = "decode") -> cp.ndarray:
            j = i % layers.copies
            pending = layers.shared_side(i) if path == "decode" else None
            w, ids = layers.route(i)
            x, gu, dn, shared = layers.x[j], layers.gate_up[j], layers.down[j], layers.shared[j]
            if path == "decode":  # as CupyOps.moe: the shared experts first, on the side
                return cupy_moe.decode_experts(k, x, w, ids, gu, dn, pending)
            return pairs(k, x, w, ids, gu, dn) + dense_mlp(k, x, *shared)

        us = timer.per_launch_us(layer, nl)
        graph = timer.graph_us(layer, nl)
        rows.append(row("moe", "layer", t, "decode", us, nbytes, graph_us=round(graph, 2),
                        floor_us=round(floor_us, 2), **extra))  # fmt: skip
        rows.append(row("moe", "route", t, "decode", timer.per_launch_us(layers.route, nl),
                        E * H * 4))  # fmt: skip
        rows += stages(timer, k, layers, t, min(nl, 60), nbytes, extra)
        if sweep:
            rows += sweep_experts(timer, k, layers, t, nl, nbytes - E * H * 4, extra)
        us = timer.per_launch_us(lambda i: layer(i, "pairs"), nl)
        rows.append(row("moe", "layer", t, "pairs_gemv", us, nbytes, **extra))
    return rows


def stages(timer: Timer, k: Kernels, layers: MoELayers, t: int, n: int, nbytes: float,
           extra: dict) -> list[dict]:  # fmt: skip
    """The decode path kernel by kernel: events between the launches of n layers, queued
    behind a spin."""
    names = ("route", "group", "gate_up", "down", "shared", "combine")
    layers.route(0)
    cp.cuda.Device().synchronize()
    timer.spin((1,), (1,), (np.uint64(int(n * 8 * timer.host_us_per_launch * 1e3 + 2e6)),))
    events = []
    for i in range(n):
        j = i % layers.copies
        ev = [cp.cuda.Event() for _ in range(len(names) + 1)]
        ev[0].record()
        w, ids = layers.route(i)
        ev[1].record()
        group, pos = cupy_moe.group_pairs(k, ids, E)
        ev[2].record()
        act, act_s = cupy_moe.gate_up_act(k, layers.x[j], group, I_MOE, layers.gate_up[j], None,
                                          TOP_K)  # fmt: skip
        ev[3].record()
        y, _ = cupy_moe.down_proj(k, act, act_s, group, H, layers.down[j], None)
        ev[4].record()  # the shared experts, here in line rather than on the side stream
        y_s = cupy_moe.shared_experts(k, layers.x[j], I_MOE, *layers.shared[j])
        ev[5].record()
        cupy_moe.combine(k, y, y_s, pos, w)
        ev[6].record()
        events.append(ev)
    held = not events[0][0].done
    events[-1][-1].synchronize()
    total = dict.fromkeys(names, 0.0)
    for ev in events:
        for s, name in enumerate(names):
            total[name] += cp.cuda.get_elapsed_time(ev[s], ev[s + 1]) * 1e3 / n
    routed = nbytes - E * H * 4
    shared = 2 * 3 * I_MOE * H * 2  # two experts' bytes
    share = {
        "route": E * H * 4,
        "group": 0,
        "gate_up": 2 / 3 * (routed - shared),
        "down": (routed - shared) / 3,
        "shared": shared,
        "combine": 0,
    }
    return [row("stage", name, t, "decode", total[name], share[name], held=held, **extra)
            for name in names]  # fmt: skip


def sweep_experts(timer: Timer, k: Kernels, layers: MoELayers, t: int, n: int, nbytes: float,
                  extra: dict) -> list[dict]:  # fmt: skip
    """decode_experts alone (routes drawn beforehand) over its launch parameters."""
    routes = [layers.route(j) for j in range(layers.copies)]
    variants = [{"gate_up_warps": w} for w in (2, 3, 4)]
    variants += [{"down_warps": dw} for dw in (1, 2, 3)]
    variants += [{"token_tiles": nt} for nt in (1, 2, 4)]
    variants += [{"shared_token_tiles": nt} for nt in (1, 2, 4)]
    variants += [{"shared_in_line": True}]
    rows = []
    for kw in [{}, *variants]:

        def run(i: int, kw: dict = kw) -> cp.ndarray:
            j = i % layers.copies
            w, ids = routes[j]
            kw = dict(kw)
            if kw.pop("shared_in_line", False):  # forked after the routing, not before
                shared = layers.shared[j]
            else:
                shared = layers.shared_side(i, kw.pop("shared_token_tiles", None))
            return cupy_moe.decode_experts(k, layers.x[j], w, ids, layers.gate_up[j],
                                           layers.down[j], shared, **kw)  # fmt: skip

        name = ",".join(f"{a}={b}" for a, b in kw.items()) or "default"
        rows.append(row("msweep", "experts", t, name, timer.per_launch_us(run, n), nbytes, **extra))
    return rows


def dense_mlp(k: Kernels, x: cp.ndarray, gate_up: cp.ndarray, down: cp.ndarray) -> cp.ndarray:
    """The shared experts as the engine ran them before they joined the experts' launches."""
    g = cupy_gemv.linear(k, x, gate_up, BF16)
    act = k.empty((x.shape[0], gate_up.shape[0] // 2), BF16)
    n = act.size
    k.launch("elementwise.cu", "silu_mul", (max(1, min(-(-n // 256), 8 * k.num_sms)),), 256,
             (g, act, act.shape[1], np.int64(n)))  # fmt: skip
    return cupy_gemv.linear(k, act, down, BF16)


def pairs(k: Kernels, x: cp.ndarray, w: cp.ndarray, ids: cp.ndarray, gate_up: cp.ndarray,
          down: cp.ndarray) -> cp.ndarray:  # fmt: skip
    """The older decode path: one warp per output row of each (token, expert) pair."""
    t = x.shape[0]
    act = k.empty((t * TOP_K, I_MOE), BF16)
    out = k.empty((t, H), BF16)
    k.launch("moe.cu", "moe_gemv_gate_up", (t * TOP_K, I_MOE // 4), 128,
             (x, ids, gate_up, act, H, I_MOE, TOP_K))  # fmt: skip
    k.launch("moe.cu", "moe_gemv_down", (t, H // 4), 128,
             (act, ids, w, down, out, H, I_MOE, TOP_K))  # fmt: skip
    return out


def kernel_resources() -> dict:
    """Registers and local memory (spills) of the decode kernels as NVRTC built them here."""
    names = [("gemv.cu", f"gemv_nt{nt}") for nt in (1, 2, 3, 4)]
    names += [
        ("moe_decode.cu", f"moe_{kind}_nt{nt}") for kind in ("gate_up", "down") for nt in (1, 2, 4)
    ]
    names += [("moe.cu", n) for n in ("moe_router_logits", "moe_topk", "moe_group")]
    out = {}
    for file, name in names:
        fn = compiled(file, name)
        out[name] = {"regs": fn.num_regs, "local_bytes": fn.local_size_bytes}
    print("kernels:", " ".join(f"{n}={v['regs']}r/{v['local_bytes']}B" for n, v in out.items()))
    return out


def copy_bandwidth(timer: Timer, nbytes: int = 2 << 30) -> float:
    """Device copy bandwidth, bytes read + written per second."""
    src = cp.empty((nbytes // 2,), cp.uint16)
    dst = cp.empty_like(src)
    us = timer.per_launch_us(lambda i: cp.copyto(dst, src), 20)
    return 2 * nbytes / (us * 1e-6)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--dense-tokens", default="1,8,32")
    p.add_argument("--moe-tokens", default="1,8,32,128")
    p.add_argument("--sweep", action="store_true", help="launch variants of the kernels too")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: dense,moe")
    args = p.parse_args(argv)
    k, timer = Kernels(), Timer()
    copy_bw = copy_bandwidth(timer)
    print(f"device copy {copy_bw / 1e12:.2f} TB/s (read + write); floor at 4.2 TB/s")
    out = {"device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(),
           "sms": k.num_sms, "copy_bytes_per_s": copy_bw, "floor_bytes_per_s": BANDWIDTH,
           "kernels": kernel_resources(), "rows": []}  # fmt: skip
    skip = set(args.skip.split(","))
    if "dense" not in skip:
        tokens = [int(v) for v in args.dense_tokens.split(",")]
        out["rows"] += bench_dense(timer, k, tokens, args.sweep)
    if "moe" not in skip:
        tokens = [int(v) for v in args.moe_tokens.split(",")]
        out["rows"] += bench_moe(timer, k, tokens, args.sweep)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
