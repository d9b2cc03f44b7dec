"""The frontend's side of the engine process: spawn it, feed it, route its tokens, watch it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, fields

import zmq
import zmq.asyncio

from pdserve.engine import messages as m
from pdserve.engine.engine_proc import EXIT_BAD_CONFIG, EXIT_PORT_IN_USE
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine_config import EngineConfig
from pdserve.metrics import NodeMetrics
from pdserve.openai.engine_protocol import (
    EngineDeadError,
    PrefillFailed,
    RequestRejected,
    TokenDelta,
)

logger = logging.getLogger("pdserve.node")

READY_TIMEOUT_S = 600.0  # loading a 21B checkpoint from a cold disk takes minutes


def ipc_dir() -> str:
    return os.environ.get("PDSERVE_IPC_DIR", tempfile.gettempdir())


class ZmqEngineClient:
    """Runs the engine as a child process and talks to it over two ipc ZeroMQ sockets."""

    def __init__(
        self,
        config: EngineConfig,
        eos_token_ids: tuple[int, ...],
        on_death: Callable[[int], None] | None = None,
        metrics: NodeMetrics | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics or NodeMetrics()
        self.eos_token_ids = eos_token_ids
        self.on_death = on_death  # called with the exit code if the engine dies on its own
        self.ctx = zmq.asyncio.Context()
        # INFERENCE_MSG_QUEUE_ID names the node's sockets (as in FastDeploy); the port and a random
        # suffix keep two nodes on one host apart even when they share an id.
        queue_id = os.environ.get("INFERENCE_MSG_QUEUE_ID", str(config.engine_worker_queue_port))
        base = os.path.join(ipc_dir(), f"pdserve-{queue_id}-{config.port}-{uuid.uuid4().hex[:8]}")
        self.in_addr, self.out_addr = f"ipc://{base}-in", f"ipc://{base}-out"
        self.to_engine = self.ctx.socket(zmq.PUSH)
        self.to_engine.setsockopt(zmq.LINGER, 0)
        self.from_engine = self.ctx.socket(zmq.PULL)
        self.from_engine.setsockopt(zmq.MAXMSGSIZE, m.MAX_MESSAGE_BYTES)
        self.proc: asyncio.subprocess.Process | None = None
        self.queues: dict[str, asyncio.Queue[TokenDelta | Exception]] = {}
        self.stats = m.EngineStats()
        self.ready: m.EngineReady | None = None
        self.dead = False
        self.stopping = False
        self.retargets: dict[str, asyncio.Future[m.RemoteKVReady]] = {}  # new transfer id ->
        self.abort_waiters: dict[str, list[asyncio.Future[None]]] = {}  # request id ->
        self._tasks: list[asyncio.Task] = []

    @property
    def num_running(self) -> int:
        return len(self.queues)

    async def start(self) -> None:
        """Spawn the engine and wait until its model is loaded; RuntimeError if it fails."""
        self.to_engine.bind(self.in_addr)
        self.from_engine.bind(self.out_addr)
        # the engine never sees the API key: its command line is readable by every local user
        cfg = json.dumps({f.name: getattr(self.config, f.name) for f in fields(self.config)}
                         | {"api_key": None})  # fmt: skip
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pdserve.engine.engine_proc", cfg, self.in_addr, self.out_addr,
            stdin=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        recv = asyncio.ensure_future(self.from_engine.recv())
        exited = asyncio.ensure_future(self.proc.wait())
        done, _ = await asyncio.wait({recv, exited}, timeout=READY_TIMEOUT_S,
                                     return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        if recv not in done:
            recv.cancel()
            code = self.proc.returncode
            await self.stop()
            if code == EXIT_BAD_CONFIG:
                raise ValueError("the engine rejected the configuration (see its message above)")
            if code == EXIT_PORT_IN_USE:
                raise ValueError(
                    f"--engine-worker-queue-port "
                    f"{self.config.engine_worker_queue_port} is already in use"
                )
            raise RuntimeError(f"engine process failed to start (exit code {code})")
        exited.cancel()
        msg = m.decode(recv.result())
        if not isinstance(msg, m.EngineReady):
            raise RuntimeError(f"engine sent {msg.TYPE} before ready")
        self.ready = msg
        self._tasks = [asyncio.create_task(self._recv_loop()), asyncio.create_task(self._watch())]

    async def _recv_loop(self) -> None:
        while True:
            frame = await self.from_engine.recv()
            try:
                msg = m.decode(frame)
            except m.MessageError as e:
                logger.error("dropped a malformed message from the engine: %s", e)
                continue
            if isinstance(msg, m.StepOutputs):
                self.stats = msg.stats
                self.metrics.update_engine(msg.stats)
                for out in msg.outputs:
                    q = self.queues.get(out.request_id)
                    if q is not None:
                        q.put_nowait(_delta(out))
            elif isinstance(msg, m.RequestFailed):
                q = self.queues.get(msg.request_id)
                if q is not None:
                    err = RequestRejected
                    if msg.unavailable:
                        err = PrefillFailed if msg.prefill_failed else EngineDeadError
                    q.put_nowait(err(msg.message))
            elif isinstance(msg, m.Aborted):
                for rid in msg.request_ids:
                    for fut in self.abort_waiters.pop(rid, []):
                        if not fut.done():
                            fut.set_result(None)
            elif isinstance(msg, m.RemoteKVReady) and msg.transfer_id in self.retargets:
                self.retargets.pop(msg.transfer_id).set_result(msg)
            elif isinstance(msg, (m.RemoteKVReady, m.PrefillDone)):
                q = self.queues.get(msg.request_id)
                if q is not None:
                    q.put_nowait(msg)

    async def _watch(self) -> None:
        assert self.proc is not None
        code = await self.proc.wait()
        self.dead = True
        if self.stopping:
            logger.info("engine process exited with code %s", code)
        else:
            logger.error("engine process exited with code %s; failing %d requests", code,
                         len(self.queues))  # fmt: skip
        for q in self.queues.values():
            q.put_nowait(EngineDeadError(f"engine process exited (code {code})"))
        if self.on_death is not None and not self.stopping:
            self.on_death(code)

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        remote: RemotePrefill | None = None,
    ) -> AsyncIterator[TokenDelta]:
        """Stream a request's tokens. With `remote` (a decode node), the engine first holds
        blocks for the prompt, `remote` has a prefill node fill them, then decoding starts."""
        if self.dead or self.ready is None:
            raise EngineDeadError("the engine is not running")
        if request_id in self.queues:
            raise RequestRejected(f"request id {request_id!r} is already in flight")
        q: asyncio.Queue[TokenDelta | Exception] = asyncio.Queue()
        self.queues[request_id] = q
        finished = False
        start = last = time.monotonic()
        num_tokens = 0
        mx = self.metrics
        try:
            await self._send(m.AddRequest(
                request_id=request_id, prompt_token_ids=list(prompt_token_ids),
                params=_params_dict(params), eos_token_ids=list(self.eos_token_ids),
                remote_prefill=remote is not None,
                transfer_id=f"{request_id}/{uuid.uuid4().hex[:8]}" if remote else "",
            ))  # fmt: skip
            while True:
                item = await q.get()
                if isinstance(item, Exception):
                    finished = True  # the engine holds nothing for it any more
                    raise item
                if isinstance(item, m.RemoteKVReady):
                    assert remote is not None
                    await self._remote_prefill(item, remote)
                    continue
                if isinstance(item, m.PrefillDone):
                    continue
                now = time.monotonic()
                (mx.tpot if num_tokens else mx.ttft).observe(now - last)
                last, num_tokens = now, num_tokens + len(item.token_ids)
                if item.finish_reason is not None:
                    finished = True
                    mx.e2e.observe(now - start)
                    mx.requests.labels(item.finish_reason).inc()
                    mx.prompt_tokens.inc(item.num_prompt_tokens)
                    mx.generation_tokens.inc(num_tokens)
                yield item
                if finished:
                    return
        finally:
            self.queues.pop(request_id, None)
            if not finished and not self.dead:
                await self.abort(request_id)

    async def _remote_prefill(self, ready: m.RemoteKVReady, remote: RemotePrefill) -> None:
        try:
            result = await remote(ready)
        except Exception as e:  # a dead, slow or broken prefill node: fall back or fail
            logger.warning("remote prefill of %s failed: %s", ready.request_id, e)
            result = RemoteResult(ok=False, error=str(e))
        if result.ok:
            self.metrics.kv_bytes_received.inc(result.kv_bytes)
        elif self.config.pd_fallback == "local":
            self.metrics.pd_fallback.inc()
        await self._send(m.RemotePrefillDone(
            request_id=ready.request_id, ok=result.ok, token_id=result.token_id,
            logprob=result.logprob, fallback_local=self.config.pd_fallback == "local",
        ))  # fmt: skip

    async def retarget(self, request_id: str, transfer_id: str) -> None:
        """Decode role: move a waiting request to a new transfer id (a prefill retry) and wait
        until the engine expects it."""
        fut = asyncio.get_running_loop().create_future()
        self.retargets[transfer_id] = fut
        try:
            await self._send(m.RemoteRetry(request_id=request_id, transfer_id=transfer_id))
            await asyncio.wait_for(fut, 10.0)
        finally:
            self.retargets.pop(transfer_id, None)

    async def prefill(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
        push: m.KVPushSpec,
    ) -> m.PrefillDone:  # fmt: skip
        """Prefill role: compute the prompt, push its KV, return once it is acknowledged."""
        if self.dead or self.ready is None:
            raise EngineDeadError("the engine is not running")
        if request_id in self.queues:
            raise RequestRejected(f"request id {request_id!r} is already in flight")
        q: asyncio.Queue[TokenDelta | Exception | m.Message] = asyncio.Queue()
        self.queues[request_id] = q
        done = False
        try:
            await self._send(m.AddRequest(
                request_id=request_id, prompt_token_ids=list(prompt_token_ids),
                params=_params_dict(params) | {"max_tokens": 1, "min_tokens": 0},
                eos_token_ids=list(self.eos_token_ids), kv_push=push,
            ))  # fmt: skip
            while True:
                item = await q.get()
                if isinstance(item, Exception):
                    done = True
                    raise item
                if isinstance(item, m.PrefillDone):
                    done = True
                    return item
        finally:
            self.queues.pop(request_id, None)
            if not done and not self.dead:
                await self.abort(request_id)

    async def abort(self, request_id: str, wait: bool = False) -> None:
        """Abort a request in the engine; with `wait`, return only once the engine confirmed it
        (so no KV write of it is still in flight, e.g. into a decode node's shared memory)."""
        if self.dead:
            return
        if not wait:
            await self._send(m.AbortRequests(request_ids=[request_id]))
            return
        fut = asyncio.get_running_loop().create_future()
        self.abort_waiters.setdefault(request_id, []).append(fut)
        await self._send(m.AbortRequests(request_ids=[request_id], ack=True))
        try:
            await asyncio.wait_for(fut, 10.0)
        finally:
            waiters = self.abort_waiters.get(request_id, [])
            if fut in waiters:
                waiters.remove(fut)
            if not waiters:
                self.abort_waiters.pop(request_id, None)

    async def _send(self, msg: m.Message) -> None:
        await self.to_engine.send(m.encode(msg))

    async def stop(self, drain_seconds: float = 0.0) -> int | None:
        """Ask the engine to finish (draining up to drain_seconds), then make sure it is gone."""
        self.stopping = True
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(zmq.ZMQError):
                await self._send(m.Shutdown(drain_seconds=drain_seconds))
            try:
                await asyncio.wait_for(self.proc.wait(), drain_seconds + 10)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        for t in self._tasks:
            t.cancel()
        self.ctx.destroy(linger=0)
        for addr in (self.in_addr, self.out_addr):
            with contextlib.suppress(OSError):
                os.unlink(addr[len("ipc://") :])
        return self.proc.returncode if self.proc else None


@dataclass
class RemoteResult:
    """What a decode node's prefill call came back with."""

    ok: bool
    token_id: int = 0
    logprob: float = 0.0
    kv_bytes: int = 0
    error: str = ""


RemotePrefill = Callable[[m.RemoteKVReady], Awaitable[RemoteResult]]


def _params_dict(params: SamplingParams) -> dict:
    return asdict(params) | {"stop_token_ids": list(params.stop_token_ids)}


def _delta(out: m.TokenOut) -> TokenDelta:
    top = None
    if out.top_ids is not None and out.top_logprobs is not None:
        top = [list(zip(out.top_ids, out.top_logprobs))]
    return TokenDelta(
        token_ids=[out.token_id], logprobs=[out.logprob], top_logprobs=top,
        finish_reason=out.finish_reason, num_prompt_tokens=out.num_prompt_tokens,
        num_cached_tokens=out.num_cached_tokens,
    )  # fmt: skip
