"""Floors (bytes and FLOPs a step needs) and the tables bench_engine.py prints."""

from __future__ import annotations

from pdserve.config import ModelConfig

TARGETS_MS = {("decode", 1): 2.2, ("decode", 32): 12.0, ("prefill", 8192): 160.0}


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
