"""One MoE layer's experts at prefill sizes on the GPU (ERNIE-4.5-21B-A3B shapes: 64 experts,
top-6, hidden 2560, intermediate 1536), the cuBLAS paths of pdserve/backends/cupy_moe_prefill.py
(padded batched GEMM, grouped GEMM, or one GEMM per expert over streams), against the FLOPs
floor at a measured bf16 GEMM rate.

    python benchmarks/bench_moe_prefill.py [--tokens 512,1024,2048,8192] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cupy as cp
import numpy as np

from pdserve.backends import cupy_moe_prefill
from pdserve.backends.cublas_capturable import has_grouped_gemm
from pdserve.backends.cupy_kernels import BF16, Kernels, gemm

H, I, E, K = 2560, 1536, 64, 6


def device_ms(fn, repeat: int = 10) -> float:
    fn()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    end.synchronize()
    return cp.cuda.get_elapsed_time(start, end) / repeat


def randn(shape: tuple[int, ...], std: float) -> cp.ndarray:
    return (cp.random.standard_normal(shape, dtype=cp.float32) * std).astype(BF16)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", default="512,1024,2048,8192")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/bench_moe_prefill.json"))
    args = p.parse_args()
    k = Kernels()
    square = randn((8192, 8192), 0.02)
    peak = 2 * 8192**3 / (device_ms(lambda: gemm(k, square, square, BF16)) * 1e-3)
    gate_up, down = randn((E, 2 * I, H), 0.02), randn((E, H, I), 0.02)
    rows = []
    print(f"bf16 GEMM peak (cuBLAS 8192^3): {peak / 1e12:.0f} TFLOP/s")
    print(f"{'mode':>10} {'tokens':>7} {'ms':>8} {'TFLOP/s':>8} {'% peak':>7} {'floor ms':>9}")
    modes = ["padded", "grouped", "streams"] if has_grouped_gemm() else ["padded", "streams"]
    for mode, t in ((m, int(s)) for m in modes for s in args.tokens.split(",")):
        cupy_moe_prefill.USE_GROUPED = mode == "grouped"
        cupy_moe_prefill.MAX_PADDING = 0.5 if mode == "padded" else -1.0
        x = randn((t, H), 1.0)
        rng = np.random.default_rng(0)
        ids = cp.asarray(np.stack([rng.choice(E, K, replace=False) for _ in range(t)]), np.int32)
        w = cp.full((t, K), 1.0 / K, np.float32)
        args_t = (k, x, w, ids, gate_up, down)
        ms = device_ms(lambda a=args_t: cupy_moe_prefill.moe_experts(*a))
        flops = 2 * t * K * 3 * H * I
        r = {"mode": mode, "tokens": t, "ms": ms, "flops": flops, "tflops": flops / ms / 1e9,
             "floor_ms": flops / peak * 1e3}  # fmt: skip
        rows.append(r)
        share = 100 * r["tflops"] * 1e12 / peak
        print(f"{mode:>10} {t:>7} {ms:>8.3f} {r['tflops']:>8.0f} {share:>6.0f}% "
              f"{r['floor_ms']:>9.3f}")  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "peak": peak,
                                     "rows": rows}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
