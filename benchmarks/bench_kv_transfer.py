"""KV transfer throughput and latency: one prompt's KV, prefill pool -> decode pool.

ERNIE-4.5-21B-A3B's KV shape (28 layers, 4 KV heads x 128, bf16 stored as uint16: 57,344 bytes
per token), 64-token blocks scattered at random in both pools. The receiver (decode side) runs
in a second process with its pool in POSIX shared memory; the sender times one transfer from
`start` to the receiver's ack: 28 `send_layer` calls, `KVDone`, ack. Each size is compared with
peers measured in the same run on the same bytes:
  memcpy      one contiguous numpy copy (np.copyto) in one process: the memory-bandwidth roof
  gather      numpy block-by-block copy pool to pool in one process (the ipc path's copies)
  push/pull   raw ZeroMQ PUSH/PULL over loopback tcp of the same bytes in the same frame sizes,
              to the second process, ended by a reply: the transport roof for the zmq path
zmq/pp = kv_zmq GB/s / push_pull GB/s; ipc/gat = kv_ipc GB/s / gather GB/s. The zmq path
copies twice more than push/pull (gather on the sender, scatter on the receiver).

    python benchmarks/bench_kv_transfer.py [--tokens 128,1024,8192,32768] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import zmq

from pdserve.kvtransfer import Destination, KVReceiver, KVSender, SharedKVPool, pool_name

LAYERS, BLOCK, HEADS, HEAD_DIM = 28, 64, 4, 128
BYTES_PER_TOKEN = LAYERS * 2 * HEADS * HEAD_DIM * 2  # 57,344
DEFAULT_JSON = Path(__file__).parent / "results" / "bench_kv_transfer.json"


def pool_shape(blocks: int) -> tuple[int, ...]:
    return (LAYERS, 2, blocks, BLOCK, HEADS, HEAD_DIM)


def receiver_main(conn, blocks: int, shm_name: str) -> None:
    """The decode side: a KVReceiver on a shared-memory pool and a raw PULL, driven by `conn`."""
    ctx = zmq.Context()
    pool = SharedKVPool.create(shm_name, pool_shape(blocks), np.uint16, replace=True)
    pool.array.fill(0)  # fault every page in now, as a serving pool long since is
    rx = KVReceiver(
        ctx, "tcp://127.0.0.1:*", pool.array, max_frame_bytes=1 << 30, shm_name=pool.name
    )
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.bind("tcp://127.0.0.1:*")
    push.bind("tcp://127.0.0.1:*")
    conn.send([s.getsockopt(zmq.LAST_ENDPOINT).decode() for s in (rx.sock, pull, push)])
    poller = zmq.Poller()
    poller.register(rx.sock, zmq.POLLIN)
    poller.register(pull, zmq.POLLIN)
    raw_left = 0
    while True:
        if conn.poll(0):
            cmd = conn.recv()
            if cmd[0] == "stop":
                break
            if cmd[0] == "expect":
                rx.expect(cmd[1], cmd[2], LAYERS)
            else:
                raw_left = cmd[1]
            conn.send("ok")
        events = dict(poller.poll(1))
        if rx.sock in events:
            for res in rx.poll():
                if not res.ok:
                    print(f"transfer {res.transfer_id} failed: {res.error}", file=sys.stderr)
        while pull in events and raw_left:
            try:
                pull.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            raw_left -= 1
            if raw_left == 0:
                push.send(b"done")
    rx.close()
    pull.close(0)
    push.close(0)
    pool.close()
    pool.unlink()
    ctx.term()


def time_kv(tx, conn, endpoint, src, tid, src_ids, dst_ids, shm: str | None, checksum: bool):
    """Seconds from start to ack of one whole transfer."""
    conn.send(("expect", tid, dst_ids))
    conn.recv()
    dest = Destination(
        endpoint,
        dst_ids,
        shm,
        pool_shape(src.shape[2]),
        "uint16",
        checksum,
        use_ipc=shm is not None,
    )
    t0 = time.perf_counter()
    tx.start(tid, dest)
    for layer in range(LAYERS):
        tx.send_layer(tid, layer, src, src_ids)
    tx.finish(tid, LAYERS, len(dst_ids))
    while not (acks := tx.poll_acks()):
        pass
    dt = time.perf_counter() - t0
    if not acks[0].ok:
        raise RuntimeError(f"transfer {tid} failed: {acks[0].error}")
    return dt


def time_push_pull(conn, push, pull, layer_bytes: int, max_frame: int) -> float:
    """Seconds to push every layer's bytes, in messages of at most `max_frame` bytes like the
    sender's, and get the reply to the last."""
    sizes = [min(max_frame, layer_bytes - i) for i in range(0, layer_bytes, max_frame)]
    msgs = [np.ones(n, np.uint8) for _ in range(LAYERS) for n in sizes]  # distinct, as KV
    conn.send(("raw", len(msgs)))
    conn.recv()
    t0 = time.perf_counter()
    for m in msgs:
        push.send(m, copy=False)
    pull.recv()
    return time.perf_counter() - t0


def run(tokens_list: list[int], repeat: int, checksum: bool, max_frame: int) -> list[dict]:
    blocks = max(tokens_list) // BLOCK + 8
    rng = np.random.default_rng(0)
    src = np.frombuffer(rng.bytes(int(np.prod(pool_shape(blocks))) * 2), np.uint16)
    src = src.reshape(pool_shape(blocks))
    scratch = np.zeros_like(src)
    scratch.fill(1)  # fault every page in now
    shm_name = pool_name(f"bench{os.getpid()}{uuid.uuid4().hex[:4]}", 8003)
    parent, child = mp.get_context("spawn").Pipe()
    proc = mp.get_context("spawn").Process(target=receiver_main, args=(child, blocks, shm_name))
    proc.start()
    kv_ep, pull_ep, push_ep = parent.recv()
    ctx = zmq.Context()
    tx = KVSender(ctx, max_frame_bytes=max_frame)
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    push.connect(pull_ep)
    pull.connect(push_ep)
    rows = []
    try:
        for tokens in tokens_list:
            n = -(-tokens // BLOCK)
            nbytes = n * BLOCK * BYTES_PER_TOKEN
            times: dict[str, list[float]] = {
                k: [] for k in ("memcpy", "gather", "push_pull", "kv_zmq", "kv_ipc")
            }
            flat_src, flat_dst = src.reshape(-1)[: nbytes // 2], scratch.reshape(-1)[: nbytes // 2]
            for i in range(repeat + 1):  # the first round warms up and is not counted
                src_ids = rng.choice(blocks, n, replace=False).tolist()
                dst_ids = rng.choice(blocks, n, replace=False).tolist()
                t0 = time.perf_counter()
                np.copyto(flat_dst, flat_src)
                t1 = time.perf_counter()
                for layer in range(LAYERS):  # block by block, as the ipc path copies
                    for s, d in zip(src_ids, dst_ids):
                        scratch[layer][:, d] = src[layer][:, s]
                t2 = time.perf_counter()
                got = {
                    "memcpy": t1 - t0,
                    "gather": t2 - t1,
                    "push_pull": time_push_pull(parent, push, pull, nbytes // LAYERS, max_frame),
                    "kv_zmq": time_kv(
                        tx, parent, kv_ep, src, f"z{tokens}.{i}", src_ids, dst_ids, None, checksum
                    ),
                    "kv_ipc": time_kv(
                        tx,
                        parent,
                        kv_ep,
                        src,
                        f"i{tokens}.{i}",
                        src_ids,
                        dst_ids,
                        shm_name,
                        checksum,
                    ),
                }
                if i:
                    for k, v in got.items():
                        times[k].append(v)
            row: dict = {"tokens": tokens, "blocks": n, "bytes": nbytes}
            for k, ts in times.items():
                med = float(np.median(ts))
                row[f"{k}_ms"] = med * 1e3
                row[f"{k}_gbps"] = nbytes / med / 1e9
            rows.append(row)
            print_row(row)
    finally:
        parent.send(("stop",))
        proc.join(30)
        tx.close()
        push.close(0)
        pull.close(0)
        ctx.term()
    return rows


KINDS = ("memcpy", "gather", "push_pull", "kv_zmq", "kv_ipc")


def print_header(checksum: bool) -> None:
    print(
        f"KV transfer of ERNIE-4.5-21B-A3B's KV ({BYTES_PER_TOKEN:,} B/token, 28 layers, bf16), "
        f"median; GB/s = 1e9 bytes/s; checksum {'on' if checksum else 'off'}"
    )
    cols = "".join(f"{k + ' ms':>13}{'GB/s':>7}" for k in KINDS)
    print(f"{'tokens':>7}{'MB':>8}{cols}{'zmq/pp':>8}{'ipc/gat':>8}")


def print_row(r: dict) -> None:
    cells = "".join(f"{r[k + '_ms']:>13.2f}{r[k + '_gbps']:>7.2f}" for k in KINDS)
    ratios = (
        f"{r['kv_zmq_gbps'] / r['push_pull_gbps']:>8.2f}{r['kv_ipc_gbps'] / r['gather_gbps']:>8.2f}"
    )
    print(f"{r['tokens']:>7}{r['bytes'] / 1e6:>8.1f}{cells}{ratios}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--tokens", default="128,512,2048,8192,32768", help="prompt lengths, comma-separated"
    )
    parser.add_argument("--repeat", type=int, default=5, help="timed transfers per size")
    parser.add_argument("--checksum", action="store_true", help="crc32 every layer frame")
    parser.add_argument("--max-frame-mb", type=float, default=16, help="sender's frame limit")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="results file")
    args = parser.parse_args(argv)
    tokens = [int(t) for t in args.tokens.split(",")]
    if min(tokens) < 1 or args.repeat < 1:
        parser.error("--tokens must be positive and --repeat >= 1")
    print_header(args.checksum)
    rows = run(tokens, args.repeat, args.checksum, int(args.max_frame_mb * (1 << 20)))
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": f"{platform.python_implementation()} {sys.version.split()[0]}",
        "zmq": zmq.zmq_version(),
    }
    config = {
        "max_frame_mb": args.max_frame_mb,
        "tokens": tokens,
        "repeat": args.repeat,
        "checksum": args.checksum,
        "layers": LAYERS,
        "block_size": BLOCK,
        "kv_heads": HEADS,
        "head_dim": HEAD_DIM,
        "bytes_per_token": BYTES_PER_TOKEN,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"config": config, "machine": machine, "rows": rows}, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
