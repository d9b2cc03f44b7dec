"""The engine's side of tensor parallelism: starting ranks 1..N-1 and talking to them.

Each worker is a process of its own (`python -m pdserve.engine.worker`), started by the engine
and killed with it (PR_SET_PDEATHSIG). It connects a DEALER to the engine-worker-queue port and
says hello with a token only its engine gave it; from then on the engine sends it each step's
inputs and its share of the KV transfers, and it reports the ends of its transfers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import zmq

from pdserve.engine import worker_protocol as w
from pdserve.engine_config import EngineConfig
from pdserve.model.forward_batch import ForwardBatch

logger = logging.getLogger("pdserve.engine")

READY_TIMEOUT_S = 600.0  # workers load their shards while rank 0 loads its own
TOKEN_ENV = "PDSERVE_WORKER_TOKEN"


@dataclass(frozen=True)
class WorkerPlan:
    """What every rank must agree on, decided by rank 0 before the workers start."""

    size: int
    tp_base: str  # ipc path prefix of the ranks' collective sockets: f"ipc://{tp_base}-{rank}"
    num_blocks: int
    num_host_blocks: int
    kv_shm_names: list[str]  # per rank, decode role: its pool in shared memory ("" if none)

    def tp_address(self, rank: int) -> str:
        return f"ipc://{self.tp_base}-{rank}"


def identity(rank: int) -> bytes:
    return b"rank-%d" % rank


class WorkerGroup:
    """Ranks 1..size-1 of this node, reached through the engine's ROUTER socket `router`."""

    def __init__(self, config: EngineConfig, plan: WorkerPlan, router: zmq.Socket) -> None:
        self.plan = plan
        self.router = router
        self.token = secrets.token_hex(16)
        self.hello: set[int] = set()
        self.ready: set[int] = set()
        self.results: list[w.KVResult] = []  # handed to the node's RankedSender/Receiver
        env = {**os.environ, TOKEN_ENV: self.token}
        cfg, pl = json.dumps(asdict(config)), json.dumps(asdict(plan))
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-m", "pdserve.engine.worker", cfg, pl, str(r)], env=env
            )  # fmt: skip
            for r in range(1, plan.size)
        ]

    def accept(self, ident: bytes, msg: w.WireMessage) -> bool:
        """A message from the engine-worker-queue port that claims to be a worker's: whether it
        is one (hello with the right token, then anything from that rank's connection)."""
        rank = next((r for r in range(1, self.plan.size) if identity(r) == ident), None)
        if rank is None:
            return False
        if isinstance(msg, w.WorkerHello):
            if msg.rank != rank or not secrets.compare_digest(msg.token, self.token):
                logger.warning("engine-worker-queue: a hello with a wrong token or rank")
                return True
            self.hello.add(rank)
        elif rank not in self.hello:
            return False
        elif isinstance(msg, w.WorkerReady):
            if msg.error:
                raise ValueError(f"tensor-parallel rank {rank} failed to start: {msg.error}")
            self.ready.add(rank)
        elif isinstance(msg, w.KVResult) and msg.rank == rank:
            self.results.append(msg)
        return True

    def wait_ready(self, pump) -> None:
        """Run `pump(timeout_ms)` (the engine's socket handling) until every worker is ready."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while len(self.ready) < self.plan.size - 1:
            self.check_alive()
            if time.monotonic() > deadline:
                raise ValueError("tensor-parallel workers did not load their shards in time")
            pump(200)

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def check_alive(self) -> None:
        for rank, p in enumerate(self.procs, start=1):
            if p.poll() is not None:
                raise ValueError(f"tensor-parallel rank {rank} exited with code {p.returncode}")

    def send(self, rank: int, msg: w.WireMessage) -> None:
        self.router.send_multipart([identity(rank), w.encode(msg)])

    def broadcast(self, msg: w.WireMessage) -> None:
        frame = w.encode(msg)
        for rank in range(1, self.plan.size):
            self.router.send_multipart([identity(rank), frame])

    def step(self, host: ForwardBatch, kv_jobs) -> None:
        self.broadcast(w.WorkerStep(
            input_ids=_ints(host.input_ids), positions=_ints(host.positions),
            slot_mapping=_ints(host.slot_mapping), query_start_loc=_ints(host.query_start_loc),
            seq_lens=_ints(host.seq_lens), block_tables=np.asarray(host.block_tables).tolist(),
            logits_indices=_ints(host.logits_indices), block_size=host.block_size,
            kv_jobs=list(kv_jobs),
        ))  # fmt: skip

    def copies(self, copies) -> None:
        self.broadcast(w.WorkerCopies(copies=[list(c) for c in copies]))

    def stop(self, timeout_s: float = 5.0) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self.broadcast(w.WorkerStop())
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _ints(x) -> list[int]:
    return np.asarray(x).reshape(-1).tolist()
