"""One MoE layer at prefill sizes on the GPU (ERNIE-4.5-21B-A3B shapes: 64 experts, top-6, hidden
2560, intermediate 1536): the router (decode kernels vs one float32 GEMM) and the experts paths
of pdserve/backends/cupy_moe_prefill.py on uniform and skewed routing, against the floor
max(FLOPs / bf16 GEMM rate, expert weight bytes / copy rate), both measured here. Also cuBLAS'
own rate on the expert shapes and the memory-bound stages alone, to show what is left where.

    python benchmarks/bench_moe_prefill.py [--tokens 512,1024,2048,8192] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cupy as cp
import numpy as np

from pdserve.backends import cupy_moe, cupy_moe_prefill, cupy_route_prefill
from pdserve.backends.cublas_capturable import CUDA_R_16BF, current
from pdserve.backends.cupy_kernels import BF16, Kernels, gemm
from pdserve.backends.cupy_moe import group_pairs

H, I, E, K = 2560, 1536, 64, 6
# Skewed routing: expert e drawn with probability ~ exp(SKEW * g_e), g ~ N(0, 1) (seed 1), K
# distinct experts a token (Gumbel top-k): the busiest expert gets ~3.0x the mean, the least
# ~0.15x, at every size here.
SKEW = 0.6


def device_ms(fn, repeat: int = 10) -> float:
    """Mean ms a call over `repeat` calls after one warm-up, host gaps included (the experts
    path syncs once a call, so the GPU idles while the host plans)."""
    fn()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    end.synchronize()
    return cp.cuda.get_elapsed_time(start, end) / repeat


def host_ms(fn, repeat: int = 3) -> float:
    """Mean ms the host spends in a call (its wait for the device sync included), the device
    idle before each."""
    total = 0.0
    for _ in range(repeat):
        cp.cuda.get_current_stream().synchronize()
        start = time.perf_counter()
        fn()
        total += time.perf_counter() - start
    cp.cuda.get_current_stream().synchronize()
    return total / repeat * 1e3


def randn(shape: tuple[int, ...], std: float) -> cp.ndarray:
    return (cp.random.standard_normal(shape, dtype=cp.float32) * std).astype(BF16)


def routing(t: int, law: str) -> np.ndarray:
    """ids [T, K] int32 of K distinct experts a token, uniform or skewed (see SKEW)."""
    logp = SKEW * np.random.default_rng(1).standard_normal(E) if law == "skewed" else np.zeros(E)
    scores = logp + np.random.default_rng(0).gumbel(size=(t, E))
    return np.argpartition(-scores, K, axis=1)[:, :K].astype(np.int32)


def bench_route(k: Kernels, tokens: list[int]) -> list[dict]:
    router = cp.random.standard_normal((E, H), dtype=cp.float32) * (1 / H**0.5)
    bias = cp.zeros(E, np.float32)
    rows = []
    print(f"\nrouting: decode kernels (moe.cu) vs float32 cuBLAS GEMM + moe_topk\n"
          f"{'tokens':>7} {'old us':>8} {'new us':>8} {'ids equal':>10}")  # fmt: skip
    for t in tokens:
        x = randn((t, H), 1.0)
        args = (k, x, router, bias, K, 1e-12)
        old = device_ms(lambda a=args: cupy_moe.moe_route(*a)) * 1e3
        new = device_ms(lambda a=args: cupy_route_prefill.moe_route(*a)) * 1e3
        same = (cupy_moe.moe_route(*args)[1] == cupy_route_prefill.moe_route(*args)[1]).all(1)
        rows.append(
            {"tokens": t, "old_us": old, "new_us": new, "rows_ids_equal": float(same.mean())}
        )
        print(f"{t:>7} {old:>8.1f} {new:>8.1f} {float(same.mean()):>10.4f}")
    return rows


def gemm_cases(m: int, n: int, kd: int, x: cp.ndarray, w: cp.ndarray, out: cp.ndarray) -> dict:
    """name -> (experts, call) for out = x @ w_e^T over E experts of m rows each: one expert's
    GEMM, E strided, and chunks of 128 and 256 rows by pointer arrays. x [E * m, kd];
    w [E, n, kd]; out [E * m, n]."""
    blas = current()
    cases = {
        f"single {m}x{n}x{kd}": (1, lambda: blas.gemm_nt(
            m, n, kd, x.data.ptr, kd, w.data.ptr, kd, out.data.ptr, n, CUDA_R_16BF)),
        f"strided x{E} {m}x{n}x{kd}": (E, lambda: blas.gemm_batched_nt(
            E, m, n, kd, x.data.ptr, kd, m * kd, w.data.ptr, kd, n * kd, out.data.ptr, n, m * n,
            CUDA_R_16BF)),
    }  # fmt: skip
    for chunk in (128, 256):
        nc = E * m // chunk
        c = np.arange(nc, dtype=np.int64) * chunk  # first row of each chunk
        e = c // m  # the expert of each chunk
        ptrs = cp.asarray(np.concatenate([x.data.ptr + c * 2 * kd, w.data.ptr + e * w.strides[0],
                                          out.data.ptr + c * 2 * n]))  # fmt: skip

        def call(p: cp.ndarray = ptrs, nc: int = nc, chunk: int = chunk) -> None:
            a = p.data.ptr
            blas.gemm_pointers_nt(nc, chunk, n, kd, a, kd, a + 8 * nc, kd, a + 16 * nc, n,
                                  CUDA_R_16BF)  # fmt: skip

        cases[f"pointers x{nc} {chunk}x{n}x{kd}"] = (E, call)
    return cases


def bench_cublas(k: Kernels, peak: float) -> list[dict]:
    """cuBLAS alone on the 8192-token uniform shapes, 768 rows an expert."""
    m = 8192 * K // E
    out = k.empty((E * m, 2 * I), BF16)
    cases = {
        **gemm_cases(m, 2 * I, H, randn((E * m, H), 1.0), randn((E, 2 * I, H), 0.02), out),
        **gemm_cases(m, H, I, randn((E * m, I), 1.0), randn((E, H, I), 0.02), out),
    }
    rows = []
    print(f"\ncuBLAS alone, 8192 tokens x top-{K} = {m} rows an expert\n"
          f"{'case':>36} {'ms':>8} {'TFLOP/s':>8} {'% peak':>7}")  # fmt: skip
    for name, (experts, fn) in cases.items():
        ms = device_ms(fn)
        _, n, kd = (int(v) for v in name.split()[-1].split("x"))
        tflops = 2 * experts * m * n * kd / ms / 1e9
        rows.append({"case": name, "ms": ms, "tflops": tflops})
        print(f"{name:>36} {ms:>8.3f} {tflops:>8.0f} {tflops * 1e12 / peak:>6.0%}")
    return rows


def bench_stages(k: Kernels) -> list[dict]:
    """The stages around the GEMMs at 8192 tokens (49152 pairs, 57344 padded rows), old vs new."""
    pairs, r = 8192 * K, 8192 * K + E * 128
    x, gu = randn((8192, H), 1.0), randn((r, 2 * I), 1.0)
    act, y = k.empty((r, I), BF16), randn((r, H), 1.0)
    w = cp.full((8192, K), 1.0 / K, np.float32)
    pos = cp.asarray(np.random.default_rng(0).permutation(r)[:pairs].astype(np.int32))
    ids = cp.asarray(routing(8192, "uniform"))
    order = cp.arange(pairs, dtype=np.int32)
    counts, rank = cp.zeros(E, np.int32), k.empty((pairs,), np.int32)
    xs, pos2 = k.empty((r, H), BF16), k.empty((pairs,), np.int32)

    def old_silu() -> None:
        k.launch("elementwise.cu", "silu_mul", (8 * k.num_sms,), 256, (gu, act, I, np.int64(r * I)))

    def count() -> None:
        counts.fill(0)
        k.launch("moe_chunks.cu", "moe_count_pairs", (4 * k.num_sms,), 256,
                 (ids, counts, rank, pairs))  # fmt: skip

    count()
    base = (cp.cumsum(counts) - counts).astype(np.int32)  # [E] rows of each expert, unpadded

    def scatter() -> None:
        k.launch("moe_chunks.cu", "moe_scatter_rows", (pairs // 8,), 256,
                 (x, ids, rank, base, xs, pos2, pairs, H, K))  # fmt: skip

    cases = {
        "silu_mul (elementwise.cu)": old_silu,
        "silu_mul_rows (new)": lambda: cupy_moe_prefill.silu_mul(k, gu, act),
        "chunk_combine (new)": lambda: cupy_moe_prefill.combine(k, y, pos, w),
        "gather: cupy take": lambda: x.view(np.uint16)[order // K].view(BF16),
        "scatter_rows (new)": scatter,
        "moe_group (moe.cu, one block)": lambda: group_pairs(k, ids, E),
        "count_pairs (new, with memset)": count,
    }
    rows = []
    print(f"\nstages around the GEMMs at 8192 tokens\n{'stage':>34} {'us':>8}")
    for name, fn in cases.items():
        us = device_ms(fn) * 1e3
        rows.append({"stage": name, "us": us})
        print(f"{name:>34} {us:>8.1f}")
    return rows


def ceilings(k: Kernels) -> tuple[float, float]:
    """bf16 GEMM FLOP/s (cuBLAS 8192^3) and copy bytes/s (read + write, 1 GiB)."""
    square = randn((8192, 8192), 0.02)
    peak = 2 * 8192**3 / (device_ms(lambda: gemm(k, square, square, BF16)) * 1e-3)
    src, dst = cp.empty(1 << 30, np.uint8), cp.empty(1 << 30, np.uint8)
    copy_ms = device_ms(lambda: dst.data.copy_from_device_async(src.data, src.nbytes))
    return peak, 2 * src.nbytes / (copy_ms * 1e-3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", default="512,1024,2048,8192")
    p.add_argument("--paths", default="padded,chunked128,chunked256,auto")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/bench_moe_prefill.json"))
    args = p.parse_args()
    k = Kernels()
    tokens = [int(s) for s in args.tokens.split(",")]
    peak, copy = ceilings(k)
    weight_bytes = 2 * E * 3 * I * H
    print(f"bf16 GEMM (cuBLAS 8192^3) {peak / 1e12:.0f} TFLOP/s, copy {copy / 1e12:.2f} TB/s "
          f"(read + write); the experts' weights {weight_bytes / 1e9:.2f} GB a layer")  # fmt: skip
    route = bench_route(k, tokens)
    raw = bench_cublas(k, peak)
    stages = bench_stages(k)
    gate_up, down = randn((E, 2 * I, H), 0.02), randn((E, H, I), 0.02)
    rows = []
    print(f"\nexperts, ms a layer (floor = max(FLOPs / GEMM rate, weights / copy rate))\n"
          f"{'path':>11} {'routing':>8} {'tokens':>7} {'busiest':>8} {'ms':>8} {'TFLOP/s':>8} "
          f"{'% peak':>7} {'floor ms':>9} {'x floor':>8} {'host ms':>8}")  # fmt: skip
    paths = args.paths.split(",")
    for path, law, t in ((a, law, t) for a in paths for law in ("uniform", "skewed")
                         for t in tokens):  # fmt: skip
        ids_host = routing(t, law)
        counts = np.bincount(ids_host.ravel(), minlength=E)
        x, ids = randn((t, H), 1.0), cp.asarray(ids_host)
        w = cp.full((t, K), 1.0 / K, np.float32)
        name = path.rstrip("0123456789")  # chunked256: path chunked, chunks of 256 rows
        chunk = int(path[len(name) :] or cupy_moe_prefill.CHUNK_ROWS)
        args_t = (k, x, w, ids, gate_up, down, name, chunk)
        ms = device_ms(lambda a=args_t: cupy_moe_prefill.moe_experts(*a))
        host = host_ms(lambda a=args_t: cupy_moe_prefill.moe_experts(*a))
        flops = 2 * t * K * 3 * H * I
        floor = max(flops / peak, weight_bytes / copy) * 1e3
        r = {"path": path, "routing": law, "tokens": t, "busiest": counts.max() / counts.mean(),
             "ms": ms, "host_ms": host, "flops": flops, "tflops": flops / ms / 1e9,
             "floor_ms": floor}  # fmt: skip
        rows.append(r)
        print(f"{path:>11} {law:>8} {t:>7} {r['busiest']:>7.2f}x {ms:>8.3f} {r['tflops']:>8.0f} "
              f"{r['tflops'] * 1e12 / peak:>6.0%} {floor:>9.3f} {ms / floor:>8.2f} "
              f"{host:>8.3f}")  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "peak": peak,
                                     "copy": copy, "weight_bytes": weight_bytes, "route": route,
                                     "cublas": raw, "stages": stages, "rows": rows},
                                    indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
