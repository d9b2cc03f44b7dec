"""The engine process: scheduler, block manager, request table and TP rank 0.

Started by a node's frontend as `python -m pdserve.engine.engine_proc CONFIG_JSON IN OUT`; it
connects to the frontend's ZeroMQ sockets (IN: requests and aborts, OUT: tokens and stats), binds
the engine-worker-queue port, loads the model, says `ready`, then steps while there is work. It
exits when told to, when its frontend dies, or on a fatal error (exit code != 0).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import signal
import sys
import time

import zmq

from pdserve.engine import messages as m
from pdserve.engine import worker_protocol as w
from pdserve.engine.engine_core import EngineCore, build_engine_core, kv_sizing
from pdserve.engine.pd_roles import make_role, token_out
from pdserve.engine.request import Request
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.tp_group import TPError, ZmqGroup
from pdserve.engine.workers import WorkerGroup, WorkerPlan
from pdserve.engine_config import EngineConfig
from pdserve.kvtransfer.shm_pool import host_id
from pdserve.log import setup_logging

logger = logging.getLogger("pdserve.engine")

STATS_INTERVAL_S = 0.5  # idle engines still report, so /metrics and health stay fresh
EXIT_BAD_CONFIG = 2
EXIT_PORT_IN_USE = 3
PR_SET_PDEATHSIG = 1


class EngineProcess:
    def __init__(self, config: EngineConfig, in_addr: str, out_addr: str) -> None:
        self.config = config
        self.ctx = zmq.Context()
        self.inbox = self.ctx.socket(zmq.PULL)
        self.inbox.setsockopt(zmq.MAXMSGSIZE, m.MAX_MESSAGE_BYTES)
        self.inbox.connect(in_addr)
        self.outbox = self.ctx.socket(zmq.PUSH)
        self.outbox.setsockopt(zmq.LINGER, 2000)
        self.outbox.connect(out_addr)
        # TP ranks 1.. (workers) and in-host peers (decode nodes finding prefill nodes) talk to
        # the engine here; anything else is answered with an error.
        self.peers = self.ctx.socket(zmq.ROUTER)
        self.peers.setsockopt(zmq.MAXMSGSIZE, m.MAX_MESSAGE_BYTES)
        self.peers.bind(f"tcp://{config.internal_host}:{config.engine_worker_queue_port}")
        self.role = make_role(config)
        self.workers: WorkerGroup | None = None
        tp = None
        size = config.tensor_parallel_size
        if size > 1:  # start the workers first: they load their shards while rank 0 loads
            _, _, num_blocks, num_host_blocks = kv_sizing(config)
            plan = WorkerPlan(size, in_addr[len("ipc://") :] + "-tp", num_blocks,
                              num_host_blocks, self.role.kv_shm_names(size))  # fmt: skip
            self.workers = WorkerGroup(config, plan, self.peers)
            tp = ZmqGroup(0, size, plan.tp_address, alive=self.workers.alive)
        self.tp = tp
        self.core: EngineCore = build_engine_core(config, self.role.kv_pool, tp, self.workers)
        if self.workers is not None:
            self.workers.wait_ready(self._pump_peers)
        self.poller = zmq.Poller()
        self.poller.register(self.inbox, zmq.POLLIN)
        self.poller.register(self.peers, zmq.POLLIN)
        self.role.attach(self.core, self.ctx, self.poller, self.workers)
        c, blocks, runner = self.core.runner.model.config, self.core.blocks, self.core.runner
        logger.info(
            "engine ready: %s (%d layers, %d experts top-%d), backend %s, KV pool %d blocks of %d "
            "tokens (%.1f MiB), host tier %d blocks, prefix caching %s, chunked prefill %s, "
            "role %s, tensor parallel %d",
            config.model, c.num_hidden_layers, c.moe_num_experts, c.moe_k, runner.ops.name,
            blocks.num_blocks, blocks.block_size, runner.kv_cache.nbytes / 2**20,
            blocks.host.num_slots if blocks.host else 0, config.enable_prefix_caching,
            config.enable_chunked_prefill, config.splitwise_role, size,
        )  # fmt: skip
        self.parent = os.getppid()
        self.drain_deadline: float | None = None

    def run(self) -> None:
        c = self.core
        self._send(m.EngineReady(num_blocks=c.blocks.num_blocks, block_size=c.blocks.block_size,
                                 max_model_len=c.scheduler.config.max_model_len,
                                 kv_shm_name=self.role.kv_shm_name,
                                 kv_shm_names=self.role.kv_shm_names(
                                     self.config.tensor_parallel_size),
                                 kv_cuda_ipc=self.role.kv_cuda_ipc, host_id=host_id(),
                                 kv_dtype=c.runner.kv_cache.dtype.name,
                                 backend=c.runner.ops.name))  # fmt: skip
        last_stats = 0.0
        while True:
            busy = self.core.scheduler.has_compute
            # waiting on KV frames or acks: poll often, but do not spin
            timeout = 0 if busy else 2 if self.role.waiting_on_network() else STATS_INTERVAL_S * 1e3
            events = dict(self.poller.poll(timeout))
            if self.inbox in events:
                self._drain_inbox()
            if self.peers in events:
                self._pump_peers(0)
            if self.workers is not None and not self.workers.alive():
                raise TPError("a tensor-parallel worker died")
            outputs = self.core.step() if self.core.scheduler.has_compute else []
            for msg in self.role.after_step():
                self._send(msg)
            now = time.monotonic()
            if outputs or now - last_stats > STATS_INTERVAL_S:
                self._send(m.StepOutputs(outputs=[token_out(o) for o in outputs],
                                         stats=self._stats()))  # fmt: skip
                last_stats = now
            if self.drain_deadline is not None and (
                not self.core.has_unfinished() or now > self.drain_deadline
            ):
                return
            if os.getppid() != self.parent:
                logger.error("frontend process died; engine exiting")
                return

    def _drain_inbox(self) -> None:
        while True:
            try:
                frame = self.inbox.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = m.decode(frame)
            except m.MessageError as e:
                logger.warning("dropped a malformed message from the frontend: %s", e)
                continue
            if isinstance(msg, m.AddRequest):
                self._add(msg)
            elif isinstance(msg, m.AbortRequests):
                for rid in msg.request_ids:
                    self.role.abort(rid)
                    self.core.abort(rid)
                if msg.ack:  # between steps: nothing of these requests is in flight any more
                    self._send(m.Aborted(request_ids=msg.request_ids))
            elif isinstance(msg, (m.RemotePrefillDone, m.RemoteRetry)):
                for reply in self.role.remote_done(msg):
                    if isinstance(reply, m.StepOutputs):
                        reply = m.StepOutputs(outputs=reply.outputs, stats=self._stats())
                    self._send(reply)
            elif isinstance(msg, m.Shutdown):
                self.drain_deadline = time.monotonic() + msg.drain_seconds

    def _add(self, msg: m.AddRequest) -> None:
        try:
            if self.drain_deadline is not None:
                raise ValueError("the node is shutting down")
            params = SamplingParams(**msg.params)
            vocab = self.core.runner.model.config.vocab_size
            if not all(0 <= t < vocab for t in msg.prompt_token_ids):
                raise ValueError(f"prompt token ids must be in [0, {vocab}), the vocabulary")
            req = Request(msg.request_id, msg.prompt_token_ids, params, tuple(msg.eos_token_ids))
            self.role.add(req, msg)
        except (TypeError, ValueError) as e:
            self._send(m.RequestFailed(request_id=msg.request_id, message=str(e)))

    def _pump_peers(self, timeout_ms: int) -> None:
        """Handle what arrived on the engine-worker-queue port, waiting up to `timeout_ms`."""
        if not self.peers.poll(timeout_ms):
            return
        while True:
            try:
                frames = self.peers.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if self.workers is not None and len(frames) == 2 and frames[0].startswith(b"rank-"):
                self._from_worker(frames[0], frames[1])
            else:
                self._answer_peer(frames)

    def _from_worker(self, ident: bytes, frame: bytes) -> None:
        assert self.workers is not None
        try:
            msg = w.decode(frame)
        except m.MessageError as e:
            logger.warning("engine-worker-queue: rejected a worker message: %s", e)
            return
        if not self.workers.accept(ident, msg):
            logger.warning("engine-worker-queue: rejected a %s from %r", msg.TYPE, ident[:16])
        elif self.workers.results:
            self.role.feed(self.workers.results)
            self.workers.results = []

    def _answer_peer(self, frames: list[bytes]) -> None:
        """In-host peers (a decode node given --innode-prefill-ports) ask who we are here."""
        reply: m.Message = m.PeerError(message="expected one peer_info? message")
        try:
            if len(frames) == 2 and isinstance(m.decode(frames[1]), m.PeerInfoRequest):
                c = self.config
                reply = m.PeerInfo(role=c.splitwise_role, pd_comm_port=c.pd_comm_port or 0,
                                   host=c.advertise_host or c.internal_host)  # fmt: skip
        except m.MessageError as e:
            reply = m.PeerError(message=str(e))
        if isinstance(reply, m.PeerError):
            logger.warning("engine-worker-queue: rejected a message: %s", reply.message)
        if len(frames) >= 2:
            self.peers.send_multipart([frames[0], m.encode(reply)])

    def _stats(self) -> m.EngineStats:
        c = self.core
        return m.EngineStats(
            num_running=len(c.scheduler.running),
            num_waiting=len(c.scheduler.waiting),
            num_free_blocks=c.blocks.num_free_blocks,
            num_blocks=c.blocks.num_blocks,
            kv_usage=c.blocks.usage,
            prefix_queries=c.blocks.prefix_queries,
            prefix_hits=c.blocks.prefix_hits,
            num_preemptions=c.num_preemptions,
            queued_prefill_tokens=sum(
                r.num_prompt_tokens - r.num_computed_tokens
                for r in (*c.scheduler.waiting, *c.scheduler.running)
                if r.num_computed_tokens < r.num_prompt_tokens
            ),
            num_host_blocks=c.blocks.host.num_slots if c.blocks.host else 0,
            swapped_in=c.blocks.swapped_in,
            swapped_out=c.blocks.swapped_out,
        )

    def _send(self, msg: m.Message) -> None:
        self.outbox.send(m.encode(msg))

    def close(self) -> None:
        for rid in list(self.core.requests):
            self.role.abort(rid)
            self.core.abort(rid)
        self._send(m.StepOutputs(outputs=[], stats=self._stats()))
        self.role.close()
        if self.workers is not None:
            self.workers.stop()
        if self.tp is not None:
            self.tp.close()
        self.ctx.destroy(linger=2000)


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the frontend dies, even mid-step (an orphaned engine would keep
    its memory and ports). Elsewhere the run loop's parent check covers it."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def main(argv: list[str]) -> int:
    config_json, in_addr, out_addr = argv
    _die_with_parent()
    # The frontend stops the engine with a Shutdown message after draining; a Ctrl-C or SIGTERM
    # sent to the whole process group must not kill it first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    config = EngineConfig(**json.loads(config_json))
    setup_logging("engine")
    try:
        proc = EngineProcess(config, in_addr, out_addr)
    except ValueError as e:
        print(f"pdserve serve: error: {e}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except zmq.ZMQError as e:
        if e.errno == zmq.EADDRINUSE:
            print(f"--engine-worker-queue-port {config.engine_worker_queue_port} is already in use",
                  file=sys.stderr)  # fmt: skip
            return EXIT_PORT_IN_USE
        raise
    try:
        proc.run()
    except TPError as e:
        logger.error("engine exiting: %s", e)
        return 1
    finally:
        proc.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
