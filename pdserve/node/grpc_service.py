"""The gRPC `Node` service every node serves on --pd-comm-port (router and peers call it)."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Callable

import grpc

from pdserve.engine import messages as m
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine_config import EngineConfig
from pdserve.node.engine_client import RemotePrefill, ZmqEngineClient
from pdserve.node.proto_convert import (
    cuda_ipc_from_proto,
    delta_to_chunk,
    load_info,
    params_from_proto,
)
from pdserve.openai.engine_protocol import (
    EngineDeadError,
    PrefillFailed,
    RequestAborted,
    RequestRejected,
)
from pdserve.proto import health_pb2
from pdserve.proto import health_pb2_grpc as health_grpc
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc

logger = logging.getLogger("pdserve.node")

MAX_GRPC_MESSAGE_BYTES = 64 * 1024 * 1024  # a 1M-token prompt is ~5 MB of varints
_TCP_ENDPOINT = re.compile(r"tcp://[A-Za-z0-9._:\[\]-]{1,253}:\d{1,5}")

# decode role: (request id, prompt, params, prefill node addresses) -> the remote prefill step
RemotePrefillFactory = Callable[[str, list[int], SamplingParams, list[str]], RemotePrefill]


class NodeService(pb_grpc.NodeServicer):
    def __init__(
        self,
        config: EngineConfig,
        engine: ZmqEngineClient,
        info: pb.NodeInfo,
        remote_prefill_for: RemotePrefillFactory | None = None,
    ) -> None:
        self.config = config
        self.engine = engine
        self.info = info
        self.remote_prefill_for = remote_prefill_for  # decode role only

    async def Generate(  # noqa: N802 (gRPC method names)
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.TokenChunk]:
        params = await _params(request.params, context)
        remote = None
        if request.prefill_node:
            if self.remote_prefill_for is None:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"a {self.config.splitwise_role} node cannot use a prefill "
                                    "node; only decode nodes can")  # fmt: skip
            remote = self.remote_prefill_for(request.request_id, list(request.prompt_token_ids),
                                             params, [request.prefill_node,
                                                      *request.fallback_prefill_nodes])  # fmt: skip
        try:
            stream = self.engine.generate(request.request_id, list(request.prompt_token_ids),
                                          params, remote)  # fmt: skip
            async for delta in stream:
                yield delta_to_chunk(delta)
        except RequestRejected as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except PrefillFailed as e:  # not this node's fault: the router must not blame it
            await context.abort(grpc.StatusCode.ABORTED, f"prefill failed: {e}")
        except RequestAborted as e:
            await context.abort(grpc.StatusCode.ABORTED, str(e))
        except EngineDeadError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))

    async def Prefill(  # noqa: N802
        self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> pb.PrefillReply:
        if self.config.splitwise_role != "prefill":
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"a {self.config.splitwise_role} node does not serve Prefill",
            )
        params = await _params(request.params, context)
        dests = sorted(request.destinations, key=lambda d: d.rank)
        size = self.config.tensor_parallel_size
        if [d.rank for d in dests] != list(range(len(dests))) or not dests:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "KV destinations must be one per rank 0..N-1")  # fmt: skip
        if len(dests) != size:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"KV destinations for ranks {[d.rank for d in dests][:16]}: this prefill node "
                f"has {size} tensor-parallel ranks and pushes rank r's KV to rank r",
            )
        for dest in dests:
            if not _TCP_ENDPOINT.fullmatch(dest.zmq_endpoint):
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"KV endpoint {dest.zmq_endpoint!r:.80} is not tcp://HOST:PORT",
                )
            if list(dest.block_ids) != list(dests[0].block_ids):
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "every rank's destination must list the same blocks",
                )
        if request.block_size != self.info.block_size or request.kv_dtype != self.info.kv_dtype:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"KV layout mismatch: block size {request.block_size} / "
                                f"{request.kv_dtype}, this node has {self.info.block_size} / "
                                f"{self.info.kv_dtype} (--block-size and --backend must "
                                "agree)")  # fmt: skip
        try:
            gpu_pools = [cuda_ipc_from_proto(d) for d in dests]
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"KV destination: {e}")
        # in-host: shared memory (NumPy pools) or CUDA IPC (GPU pools), where the host matches
        use_ipc = "ipc" in self.config.cache_transfer_protocol.split(",") and all(
            (d.shm_name or gpu is not None) and d.host_id == self.info.host_id
            for d, gpu in zip(dests, gpu_pools)
        )
        push = m.KVPushSpec(
            transfer_id=request.transfer_id, zmq_endpoints=[d.zmq_endpoint for d in dests],
            shm_names=[d.shm_name for d in dests] if use_ipc else [],
            cuda_ipc=gpu_pools if use_ipc and None not in gpu_pools else [],
            pool_blocks=dests[0].pool_blocks, host_id=dests[0].host_id,
            block_ids=list(dests[0].block_ids), first_block=request.first_block,
            checksum=request.checksum,
        )  # fmt: skip
        try:
            done = await self.engine.prefill(request.request_id, list(request.prompt_token_ids),
                                             params, push)  # fmt: skip
        except RequestRejected as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except RequestAborted as e:
            await context.abort(grpc.StatusCode.ABORTED, str(e))
        except EngineDeadError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        if not done.ok or done.output is None:
            await context.abort(grpc.StatusCode.ABORTED, f"KV transfer failed: {done.error}")
        self.engine.metrics.kv_bytes_sent.inc(done.kv_bytes)
        self.engine.metrics.kv_transfers.labels(done.transport).inc()
        out = done.output
        return pb.PrefillReply(first_token_id=out.token_id, logprob=out.logprob,
                               num_cached_tokens=out.num_cached_tokens,
                               kv_bytes_sent=done.kv_bytes,
                               transport=done.transport)  # fmt: skip

    async def Abort(  # noqa: N802
        self, request: pb.AbortRequest, context: grpc.aio.ServicerContext
    ) -> pb.AbortReply:
        known = [rid for rid in request.request_ids if rid in self.engine.queues]
        for rid in request.request_ids:
            # replies once the engine is between steps: nothing of it is still being written
            await self.engine.abort(rid, wait=True)
            q = self.engine.queues.get(rid)
            if q is not None:  # end its Generate / Prefill call instead of leaving it waiting
                q.put_nowait(RequestAborted("aborted by an Abort call"))
        return pb.AbortReply(aborted=len(known))

    async def GetLoad(  # noqa: N802
        self, request: pb.LoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoadInfo:
        return load_info(self.engine.stats)

    async def GetInfo(  # noqa: N802
        self, request: pb.InfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.NodeInfo:
        return self.info


async def _params(msg: pb.SamplingParams, context: grpc.aio.ServicerContext) -> SamplingParams:
    try:
        return params_from_proto(msg)
    except ValueError as e:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))


class HealthService(health_grpc.HealthServicer):
    """grpc.health.v1 for probes: SERVING while `serving()` says so."""

    def __init__(self, serving: Callable[[], bool]) -> None:
        self.serving = serving

    def _status(self, request: health_pb2.HealthCheckRequest) -> health_pb2.HealthCheckResponse:
        s = health_pb2.HealthCheckResponse
        if request.service not in ("", "pdserve.v1.Node", "pdserve.v1.Router"):
            return s(status=s.SERVICE_UNKNOWN)
        return s(status=s.SERVING if self.serving() else s.NOT_SERVING)

    async def Check(self, request, context):  # noqa: N802
        return self._status(request)

    async def Watch(self, request, context):  # noqa: N802
        last = None
        while True:
            status = self._status(request)
            if status.status != last:
                last = status.status
                yield status
            await asyncio.sleep(0.5)


def grpc_server(health: HealthService) -> grpc.aio.Server:
    """A gRPC server with our message limits and the standard health service."""
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_BYTES),
        ("grpc.so_reuseport", 0),
    ])  # fmt: skip
    health_grpc.add_HealthServicer_to_server(health, server)
    return server
