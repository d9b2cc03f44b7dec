"""The TTFT a router adds: the same mixed node called directly and through `pdserve router`.

Starts one mixed node (tiny model, CPU) and a router in front of it, then sends the same
streamed requests (one token each, sequentially, after a warmup) to both and reports the time to
the first streamed token: median, p90 and the router's added milliseconds. Also 1P1D through the
router, to show what disaggregation costs on top (two gRPC hops and a KV transfer).

    python benchmarks/bench_router.py [--requests 50] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.integration.conftest import start_node  # noqa: E402
from tests.integration.test_router import start_router  # noqa: E402

DEFAULT_JSON = Path(__file__).parent / "results" / "bench_router.json"
PROMPT = "the quick brown fox jumps over the lazy dog " * 4  # 176 bytes: 3 blocks of 64


def ttfts(client: openai.OpenAI, n: int) -> list[float]:
    """Milliseconds to the first streamed token of n sequential one-token requests."""
    out = []
    for _ in range(n):
        start = time.perf_counter()
        stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=1,
                                           temperature=0, stream=True)  # fmt: skip
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                out.append((time.perf_counter() - start) * 1e3)
                break
        for _ in stream:
            pass
    return out


def summary(name: str, xs: list[float], base: float | None) -> dict:
    xs = sorted(xs)
    row = {"path": name, "median_ms": statistics.median(xs), "p90_ms": xs[int(0.9 * len(xs))],
           "n": len(xs)}  # fmt: skip
    row["added_ms"] = None if base is None else row["median_ms"] - base
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = ap.parse_args()
    nodes = []
    try:
        mixed = start_node()
        prefill = start_node("--splitwise-role", "prefill")
        decode = start_node("--splitwise-role", "decode")
        nodes += [mixed, prefill, decode]
        r_mixed = start_router("--mixed-nodes", f"127.0.0.1:{mixed.grpc_port}")
        r_pd = start_router("--prefill-nodes", f"127.0.0.1:{prefill.grpc_port}",
                            "--decode-nodes", f"127.0.0.1:{decode.grpc_port}")  # fmt: skip
        nodes += [r_mixed, r_pd]
        paths = [("mixed node, direct", mixed), ("router -> mixed node", r_mixed),
                 ("router -> decode -> prefill (1P1D)", r_pd)]  # fmt: skip
        rows = []
        for name, target in paths:
            client = target.client()
            ttfts(client, 10)  # warmup: prefix cache, connections
            xs = ttfts(client, args.requests)
            rows.append(summary(name, xs, rows[0]["median_ms"] if rows else None))
    finally:
        for n in nodes:
            n.stop()
    print(
        f"TTFT of a {len(PROMPT)}-byte prompt, 1 token, {args.requests} sequential requests "
        "(tiny model, CPU, loopback); added = median minus the direct call's median"
    )
    print(f"{'path':36} {'median ms':>10} {'p90 ms':>8} {'added ms':>9}")
    for r in rows:
        added = "" if r["added_ms"] is None else f"{r['added_ms']:.2f}"
        print(f"{r['path']:36} {r['median_ms']:10.2f} {r['p90_ms']:8.2f} {added:>9}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"requests": args.requests, "prompt_bytes": len(PROMPT),
                                     "machine": {"platform": platform.platform(),
                                                 "python": platform.python_version()},
                                     "rows": rows}, indent=2))  # fmt: skip
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
