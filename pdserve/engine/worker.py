"""A tensor-parallel worker: rank r (>= 1) of a node, started by the engine as
`python -m pdserve.engine.worker CONFIG_JSON PLAN_JSON RANK`.

It loads rank r's shard of the weights, holds rank r's KV pool (in shared memory on a decode
node) and KV agent (on cache-queue-port + r), then runs each forward pass the engine sends,
taking part in the ranks' all-reduces. It decides nothing. It exits when told to, when the
engine dies, or when a collective fails (exit code 1; the engine then fails the node).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys

import numpy as np
import zmq

from pdserve.backends import get_ops
from pdserve.engine import worker_protocol as w
from pdserve.engine.engine_proc import _die_with_parent
from pdserve.engine.messages import MAX_MESSAGE_BYTES, MessageError
from pdserve.engine.model_runner import ModelRunner
from pdserve.engine.rank_kv import RankKV
from pdserve.engine.tp_group import TPError, ZmqGroup
from pdserve.engine.workers import TOKEN_ENV, WorkerPlan, identity
from pdserve.engine_config import EngineConfig
from pdserve.kvtransfer.device_copy import is_device_array
from pdserve.kvtransfer.receiver import KVReceiver, kv_endpoint
from pdserve.kvtransfer.sender import KVSender
from pdserve.kvtransfer.shm_pool import SharedKVPool
from pdserve.log import setup_logging
from pdserve.model.ernie45_moe import load_model
from pdserve.model.forward_batch import ForwardBatch
from pdserve.model.tiny import resolve_model_path

logger = logging.getLogger("pdserve.worker")


class Worker:
    def __init__(self, config: EngineConfig, plan: WorkerPlan, rank: int) -> None:
        self.rank = rank
        self.ctx = zmq.Context()
        self.engine = self.ctx.socket(zmq.DEALER)
        self.engine.setsockopt(zmq.IDENTITY, identity(rank))
        self.engine.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        self.engine.setsockopt(zmq.LINGER, 1000)
        self.engine.connect(f"tcp://{config.internal_host}:{config.engine_worker_queue_port}")
        self._send(w.WorkerHello(rank=rank, token=os.environ.get(TOKEN_ENV, "")))
        self.parent = os.getppid()
        self.pool: SharedKVPool | None = None
        self.kv: RankKV | None = None
        try:
            self._build(config, plan)
        except (ValueError, OSError, zmq.ZMQError) as e:
            self._send(w.WorkerReady(rank=rank, error=str(e)))
            self.close()
            raise
        self._send(w.WorkerReady(rank=rank))

    def _build(self, config: EngineConfig, plan: WorkerPlan) -> None:
        self.tp = ZmqGroup(self.rank, plan.size, plan.tp_address, alive=self._parent_alive)
        ops = get_ops(config.backend, config.tensor_parallel_size)
        quant = None if config.quantization in (None, "none") else config.quantization
        path = resolve_model_path(config.model)
        model = load_model(path, ops, progress=False, quantization=quant, tp=self.tp)
        shape = model.kv_cache_shape(plan.num_blocks, config.block_size)
        shm_name = plan.kv_shm_names[self.rank] if plan.kv_shm_names else ""
        if shm_name:
            self.pool = SharedKVPool.create(shm_name, shape, "float32")
        pool = self.pool.array if self.pool is not None else None
        self.runner = ModelRunner(model, ops, plan.num_blocks, config.block_size,
                                  plan.num_host_blocks, pool)  # fmt: skip
        sender = receiver = None
        if config.splitwise_role == "prefill":
            sender = KVSender(self.ctx, send_timeout_s=1.0,
                              device=is_device_array(self.runner.kv_cache))  # fmt: skip
        elif config.splitwise_role == "decode":
            port = config.cache_queue_port + self.rank
            bind = kv_endpoint(config.internal_host, config.cache_queue_port, self.rank)
            try:
                receiver = KVReceiver(self.ctx, bind, self.runner.kv_cache, shm_name=shm_name)
            except zmq.ZMQError as e:
                raise ValueError(f"--cache-queue-port {config.cache_queue_port} + rank "
                                 f"{self.rank} = {port}: {e}") from None  # fmt: skip
        self.kv = RankKV(self.rank, self.runner.kv_cache, sender, receiver)

    def _parent_alive(self) -> bool:
        return os.getppid() == self.parent

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.engine, zmq.POLLIN)
        if self.kv.receiver is not None:
            poller.register(self.kv.receiver.sock, zmq.POLLIN)
        while self._parent_alive():
            events = dict(poller.poll(2 if self.kv.busy else 500))
            if self.engine in events and not self._drain():
                return
            for result in self.kv.poll():
                self._send(result)

    def _drain(self) -> bool:
        """Handle every queued message from the engine; False once told to stop."""
        while True:
            try:
                frame = self.engine.recv(zmq.NOBLOCK)
            except zmq.Again:
                return True
            try:
                msg = w.decode(frame)
            except MessageError as e:
                logger.error("rank %d: malformed message from the engine: %s", self.rank, e)
                continue
            if isinstance(msg, w.WorkerStop):
                return False
            if isinstance(msg, w.WorkerStep):
                self._step(msg)
            elif isinstance(msg, w.WorkerCopies):
                self.runner.copy_blocks([tuple(c) for c in msg.copies])
            else:
                self.kv.handle(msg)

    def _step(self, msg: w.WorkerStep) -> None:
        host = ForwardBatch(
            input_ids=np.asarray(msg.input_ids, np.int64),
            positions=np.asarray(msg.positions, np.int64),
            slot_mapping=np.asarray(msg.slot_mapping, np.int64),
            query_start_loc=np.asarray(msg.query_start_loc, np.int32),
            seq_lens=np.asarray(msg.seq_lens, np.int32),
            block_tables=np.asarray(msg.block_tables, np.int32),
            logits_indices=np.asarray(msg.logits_indices, np.int64),
            block_size=msg.block_size,
            query_start_loc_host=list(msg.query_start_loc),
            seq_lens_host=list(msg.seq_lens),
        )
        self.runner.execute_batch(host, self.kv.layer_hook(msg.kv_jobs))

    def _send(self, msg: w.WireMessage) -> None:
        self.engine.send(w.encode(msg))

    def close(self) -> None:
        if hasattr(self, "tp"):
            self.tp.close()
        if self.kv is not None:
            self.kv.close()
        if self.pool is not None:
            self.pool.close()
            self.pool.unlink()
        self.ctx.destroy(linger=1000)


def main(argv: list[str]) -> int:
    config_json, plan_json, rank = argv
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the engine decides when its workers stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    config = EngineConfig(**json.loads(config_json))
    plan = WorkerPlan(**json.loads(plan_json))
    setup_logging("engine")
    try:
        worker = Worker(config, plan, int(rank))
    except (ValueError, OSError, zmq.ZMQError) as e:
        logger.error("rank %s: %s", rank, e)
        return 2
    try:
        worker.run()
    except TPError as e:
        logger.error("rank %s: %s", rank, e)
        return 1
    finally:
        worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
