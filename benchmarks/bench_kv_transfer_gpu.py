"""KV transfer between GPU pools on one host: one prompt's KV, prefill process -> decode process.

ERNIE-4.5-21B-A3B's KV shape (28 layers, 4 KV heads x 128, bf16: 57,344 bytes per token),
64-token blocks. The decode side runs in a second process with a bf16 pool on the GPU, shared
through CUDA IPC; the sender times one transfer from `start` to the receiver's ack: 28
`send_layer` calls (each ordered after the current stream with an event, as after a layer's
compute), `KVDone`, ack; `issue` is the part of it the engine loop spends in those calls
(the rest overlaps with compute when a real prefill runs). Transports:
  ipc  device-to-device copies into the opened pool on a side stream (two memcpys per run of
       consecutive blocks); compared with the device copy ceiling, 4.3 TB/s read + write
       (DESIGN.md 5a), i.e. 2.15 TB/s of KV moved
  zmq  blocks gathered into pinned host memory on the side stream, sent over loopback tcp,
       scattered into the decode pool with host-to-device copies
Blocks are `contiguous` (one run per layer) or `scattered` (random ids in both pools: a memcpy
per block and K/V, the worst case).

    python benchmarks/bench_kv_transfer_gpu.py [--tokens 1024,8192] [--repeat 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time

import numpy as np
import zmq

from pdserve.kvtransfer import Destination, KVReceiver, KVSender

LAYERS, BLOCK, HEADS, HEAD_DIM = 28, 64, 4, 128
BYTES_PER_TOKEN = LAYERS * 2 * HEADS * HEAD_DIM * 2  # 57,344
IPC_CEILING_GBS = 4300 / 2  # device copy bandwidth counts read + write


def pool_shape(blocks: int) -> tuple[int, ...]:
    return (LAYERS, 2, blocks, BLOCK, HEADS, HEAD_DIM)


def receiver_main(conn, blocks: int, expected: list[tuple[str, list[int]]]) -> None:
    """The decode side: a KVReceiver on an exported GPU pool, expecting every transfer."""
    from pdserve.backends.cupy_ops import CupyOps
    from pdserve.kvtransfer.cuda_ipc import export_pool, ipc_pool_name

    ctx = zmq.Context()
    kv = CupyOps().alloc_kv_cache(pool_shape(blocks))
    pool = export_pool(kv)
    rx = KVReceiver(ctx, "tcp://127.0.0.1:*", kv, max_frame_bytes=1 << 30,
                    shm_name=ipc_pool_name(pool.handle))  # fmt: skip
    for tid, ids in expected:
        rx.expect(tid, ids, LAYERS)
    conn.send((rx.endpoint, pool))
    done = 0
    while done < len(expected):
        done += len(rx.poll())
        time.sleep(0.0002)
    conn.recv()  # the sender is done with the pool
    rx.close()
    ctx.destroy(linger=0)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", default="1024,8192")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    import cupy as cp

    from pdserve.backends.cupy_ops import CupyOps

    sizes = [int(t) for t in args.tokens.split(",")]
    pool_blocks = 2 * max(sizes) // BLOCK + 8
    rng = np.random.default_rng(0)
    plan = []  # (transport, layout, tokens, rep, transfer id, src ids, dst ids)
    for transport in ("ipc", "zmq"):
        for layout in ("contiguous", "scattered"):
            for tokens in sizes:
                n = tokens // BLOCK
                for rep in range(args.repeat + 1):  # the first is warmup
                    if layout == "contiguous":
                        src, dst = list(range(n)), list(range(n, 2 * n))
                    else:
                        src = rng.permutation(pool_blocks)[:n].tolist()
                        dst = rng.permutation(pool_blocks)[:n].tolist()
                    tid = f"{transport}-{layout}-{tokens}-{rep}"
                    plan.append((transport, layout, tokens, rep, tid, src, dst))
    here, there = mp.get_context("spawn").Pipe()
    peer = mp.get_context("spawn").Process(
        target=receiver_main, args=(there, pool_blocks, [(p[4], p[6]) for p in plan])
    )
    peer.start()
    endpoint, pool = here.recv()
    src_pool = CupyOps().alloc_kv_cache(pool_shape(pool_blocks))
    src_pool.view(np.uint16)[...] = cp.random.randint(0, 1 << 15, src_pool.shape, dtype=np.uint16)
    ctx = zmq.Context()
    tx = KVSender(ctx, send_timeout_s=30, device=True)
    times: dict[tuple[str, str, int], list[tuple[float, float]]] = {}
    for transport, layout, tokens, rep, tid, src, dst in plan:
        dest = Destination(endpoint, dst, None, pool_shape(pool_blocks), "bfloat16",
                           use_ipc=transport == "ipc", cuda_ipc=pool)  # fmt: skip
        cp.cuda.Device().synchronize()
        t0 = time.perf_counter()
        assert tx.start(tid, dest, timeout_s=60) == transport
        for layer in range(LAYERS):
            tx.send_layer(tid, layer, src_pool, src, 0)
        tx.finish(tid, LAYERS, len(dst))
        issued = time.perf_counter() - t0
        acks = []
        while not acks:
            acks = tx.poll_acks()
        elapsed = time.perf_counter() - t0
        assert acks[0].ok, acks[0].error
        if rep:
            times.setdefault((transport, layout, tokens), []).append((elapsed, issued))
    here.send("done")
    peer.join(30)
    tx.close()
    ctx.destroy(linger=0)
    rows = []
    print(f"{'transport':>9} {'layout':>10} {'tokens':>7} {'MB':>7} {'ms':>8} {'issue ms':>8} "
          f"{'GB/s':>7} {'of ceiling':>10}")  # fmt: skip
    for (transport, layout, tokens), ts in times.items():
        ms = statistics.median(t for t, _ in ts) * 1e3
        issue = statistics.median(i for _, i in ts) * 1e3
        mb = tokens * BYTES_PER_TOKEN / 1e6
        gbs = mb / ms
        share = f"{gbs / IPC_CEILING_GBS:.0%}" if transport == "ipc" else ""
        print(f"{transport:>9} {layout:>10} {tokens:>7} {mb:>7.1f} {ms:>8.2f} {issue:>8.2f} "
              f"{gbs:>7.1f} {share:>10}")  # fmt: skip
        rows.append(dict(transport=transport, layout=layout, tokens=tokens, megabytes=mb,
                         median_ms=ms, issue_ms=issue, gb_per_s=gbs,
                         runs_ms=[t * 1e3 for t, _ in ts]))  # fmt: skip
    if args.json:
        device = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
        with open(args.json, "w") as f:
            json.dump(dict(device=device, ipc_ceiling_gb_per_s=IPC_CEILING_GBS, rows=rows), f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
