"""What the engine process does differently as a prefill or decode node (DESIGN.md section 2).

`MixedRole` does nothing extra. `PrefillRole` pushes prompts' KV to decode nodes and answers with
the first token once the decode node acknowledged every byte. `DecodeRole` holds a KV pool that
in-host prefill nodes can write (in shared memory on the NumPy backend, shared through CUDA IPC
on a GPU) and a KV receiver, admits requests whose prompt KV comes from afar, and starts them
from the prefill node's first token (or recomputes their prompt when the transfer failed).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import zmq

from pdserve.backends import resolve_backend
from pdserve.engine import messages as m
from pdserve.engine.disagg import DecodeHandoff, PrefillHandoff
from pdserve.engine.engine_core import EngineCore, RequestOutput
from pdserve.engine.rank_kv import RankedReceiver, RankedSender
from pdserve.engine.request import Request
from pdserve.engine_config import EngineConfig
from pdserve.kvtransfer.device_copy import is_device_array
from pdserve.kvtransfer.receiver import KVReceiver
from pdserve.kvtransfer.schema import CudaIpcPool
from pdserve.kvtransfer.sender import Destination, KVSender
from pdserve.kvtransfer.shm_pool import SharedKVPool, pool_name

logger = logging.getLogger("pdserve.engine")


class MixedRole:
    kv_shm_name = ""
    kv_cuda_ipc: list[CudaIpcPool] = []  # decode role on a GPU: its pool, per rank

    def kv_shm_names(self, size: int) -> list[str]:
        """Shared-memory names of the KV pools of ranks 0..size-1 ([] when not shared)."""
        return []

    def kv_pool(self, shape: tuple[int, ...]) -> np.ndarray | None:
        return None  # the backend allocates it

    def attach(
        self, core: EngineCore, ctx: zmq.Context, poller: zmq.Poller, workers: Any = None
    ) -> None:
        self.core = core

    def feed(self, results: list) -> None:
        """KV transfer results reported by tensor-parallel workers."""

    def add(self, req: Request, msg: m.AddRequest) -> None:
        if msg.remote_prefill or msg.kv_push is not None:
            raise ValueError(f"a {type(self).__name__[:-4].lower()} node cannot take that request")
        self.core.add_request(req)

    def remote_done(self, msg: m.RemotePrefillDone | m.RemoteRetry) -> list[m.Message]:
        return [m.RequestFailed(request_id=msg.request_id, message="not a decode node")]

    def after_step(self) -> list[m.Message]:
        """Messages for the frontend that the last step or the network produced."""
        return []

    def waiting_on_network(self) -> bool:
        return False

    def abort(self, request_id: str) -> None:
        pass

    def close(self) -> None:
        pass


class PrefillRole(MixedRole):
    def __init__(self, config: EngineConfig) -> None:
        self.config = config

    def attach(
        self, core: EngineCore, ctx: zmq.Context, poller: zmq.Poller, workers: Any = None
    ) -> None:
        self.core = core
        # a decode node that vanished must not stall this engine for long
        local = KVSender(ctx, send_timeout_s=1.0, device=is_device_array(core.runner.kv_cache))
        send = workers.send if workers is not None else None
        self.sender = RankedSender(local, self.config.tensor_parallel_size, send)
        self.pusher = PrefillHandoff(core, self.sender, ack_timeout_s=self.config.pd_timeout)
        core.pusher = self.pusher

    def feed(self, results: list) -> None:
        self.sender.results.extend(results)

    def add(self, req: Request, msg: m.AddRequest) -> None:
        push = msg.kv_push
        if push is None:  # a prefill node also serves plain requests (the router may fall back)
            self.core.add_request(req)
            return
        kv = self.core.runner.kv_cache
        # the destination pools: our layout (per rank) with their own number of blocks
        shape = (kv.shape[0], 2, push.pool_blocks, *kv.shape[3:])
        n = len(push.zmq_endpoints)
        shm_names, gpu_pools = push.shm_names or [""] * n, push.cuda_ipc or [None] * n
        # in-host when the decode pool is reachable; the sender picks shared memory or CUDA
        # IPC by where our own pool is (and falls back to ZeroMQ, saying so, when it cannot)
        dests = [
            Destination(endpoint, push.block_ids, shm or None, shape, kv.dtype.name,
                        push.checksum, (bool(shm) or gpu is not None) and push.pool_blocks > 0,
                        gpu)
            for endpoint, shm, gpu in zip(push.zmq_endpoints, shm_names, gpu_pools)
        ]  # fmt: skip
        self.core.add_request(req)
        try:
            self.pusher.start(req, push.transfer_id, dests, push.first_block)
        except Exception:
            self.core.abort(req.request_id)
            raise

    def after_step(self) -> list[m.Message]:
        return [
            m.PrefillDone(request_id=r.request_id, ok=r.ok, error=r.error,
                          output=token_out(r.output) if r.output else None, kv_bytes=r.kv_bytes,
                          transport=r.transport)
            for r in self.pusher.poll()
        ]  # fmt: skip

    def waiting_on_network(self) -> bool:
        return self.pusher.busy

    def abort(self, request_id: str) -> None:
        self.pusher.abort(request_id)

    def close(self) -> None:
        self.pusher.sender.close()


class DecodeRole(MixedRole):
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        prefix = os.environ.get("INFERENCE_MSG_QUEUE_ID", str(config.engine_worker_queue_port))
        # a GPU pool is the backend's own allocation (shared through CUDA IPC once it exists)
        self.in_shm = resolve_backend(config.backend, config.tensor_parallel_size) == "numpy"
        self.kv_shm_name = pool_name(prefix, config.cache_queue_port) if self.in_shm else ""
        self.kv_cuda_ipc = []
        self._prefix = prefix
        self.pool: SharedKVPool | None = None

    def kv_shm_names(self, size: int) -> list[str]:
        if not self.in_shm:
            return []
        return [pool_name(self._prefix, self.config.cache_queue_port + r) for r in range(size)]

    def kv_pool(self, shape: tuple[int, ...]) -> np.ndarray | None:
        if not self.in_shm:
            return None
        # the pool lives in shared memory so in-host prefill nodes copy straight into it
        self.pool = SharedKVPool.create(self.kv_shm_name, shape, np.float32)
        return self.pool.array

    def attach(
        self, core: EngineCore, ctx: zmq.Context, poller: zmq.Poller, workers: Any = None
    ) -> None:
        self.core = core
        kv = core.runner.kv_cache
        name = self.kv_shm_name  # what in-host senders name the pool in their KVLayerIPC frames
        if is_device_array(kv):
            from pdserve.kvtransfer.cuda_ipc import export_pool, ipc_pool_name

            self.kv_cuda_ipc = [export_pool(kv)]
            name = ipc_pool_name(self.kv_cuda_ipc[0].handle)
            logger.info("KV pool shared through CUDA IPC (%d bytes)", kv.nbytes)
        bind = f"tcp://{self.config.internal_host}:{self.config.cache_queue_port}"
        try:
            local = KVReceiver(ctx, bind, kv, shm_name=name or None)
        except zmq.ZMQError as e:
            raise ValueError(f"--cache-queue-port {self.config.cache_queue_port}: {e}") from None
        send = workers.send if workers is not None else None
        self.receiver = RankedReceiver(local, self.config.tensor_parallel_size, send)
        self.handoff = DecodeHandoff(core, self.receiver)
        poller.register(self.receiver.sock, zmq.POLLIN)

    def feed(self, results: list) -> None:
        self.receiver.results.extend(results)

    def add(self, req: Request, msg: m.AddRequest) -> None:
        if msg.kv_push is not None:
            raise ValueError("a decode node does not push KV")
        if msg.remote_prefill:
            req.remote_prefill = True
            req.transfer_id = msg.transfer_id
        self.core.add_request(req)

    def remote_done(self, msg: m.RemotePrefillDone | m.RemoteRetry) -> list[m.Message]:
        if isinstance(msg, m.RemoteRetry):
            wait = self.handoff.retarget(msg.request_id, msg.transfer_id)
            return [] if wait is None else [self._ready(wait.req, wait.first_block)]
        if msg.ok:
            out = self.handoff.complete(msg.request_id, msg.token_id, msg.logprob)
            if out is not None:
                return [m.StepOutputs(outputs=[token_out(out)], stats=m.EngineStats())]
            logger.warning("prefill of %s replied but its KV did not all land", msg.request_id)
        if msg.fallback_local and self.handoff.fallback(msg.request_id):
            logger.warning("recomputing the prompt of %s locally (pd fallback)", msg.request_id)
            return []
        self.handoff.abort(msg.request_id)
        self.core.abort(msg.request_id)
        return [
            m.RequestFailed(
                request_id=msg.request_id,
                unavailable=True,
                prefill_failed=True,
                message="the prefill node failed and --pd-fallback is fail",
            )
        ]

    def after_step(self) -> list[m.Message]:
        self.handoff.poll()
        msgs: list[m.Message] = []
        for req in self.core.remote_admitted:
            wait = self.handoff.admitted(req, req.transfer_id)
            msgs.append(self._ready(req, wait.first_block))
        self.core.remote_admitted.clear()
        return msgs

    def _ready(self, req: Request, first_block: int) -> m.RemoteKVReady:
        n = self.core.blocks.blocks_needed(req.num_prompt_tokens)
        return m.RemoteKVReady(
            request_id=req.request_id, transfer_id=self.handoff.waiting[req.request_id].transfer_id,
            first_block=first_block, block_ids=req.block_ids[first_block:n],
            num_cached_tokens=first_block * self.core.blocks.block_size,
        )  # fmt: skip

    def waiting_on_network(self) -> bool:
        return bool(self.handoff.waiting)

    def abort(self, request_id: str) -> None:
        self.handoff.abort(request_id)

    def close(self) -> None:
        self.receiver.close()
        if self.pool is not None:
            self.pool.close()
            self.pool.unlink()


def make_role(config: EngineConfig) -> MixedRole:
    if config.splitwise_role == "prefill":
        return PrefillRole(config)
    if config.splitwise_role == "decode":
        return DecodeRole(config)
    return MixedRole()


def token_out(o: RequestOutput) -> m.TokenOut:
    top_ids = top_lps = None
    if o.top_logprobs is not None:
        top_ids, top_lps = o.top_logprobs[0].tolist(), o.top_logprobs[1].tolist()
    return m.TokenOut(
        request_id=o.request_id, token_id=o.token_id, logprob=o.logprob, top_ids=top_ids,
        top_logprobs=top_lps, finish_reason=o.finish_reason,
        num_prompt_tokens=o.num_prompt_tokens, num_cached_tokens=o.num_cached_tokens,
    )  # fmt: skip
