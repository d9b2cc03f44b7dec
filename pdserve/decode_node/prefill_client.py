"""A decode node's calls to prefill nodes: `Prefill` over gRPC, retries, in-host discovery."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
import zmq
import zmq.asyncio

from pdserve.engine import messages as m
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine_config import EngineConfig
from pdserve.kvtransfer.receiver import kv_endpoint
from pdserve.node.engine_client import RemotePrefill, RemoteResult, ZmqEngineClient
from pdserve.node.grpc_service import MAX_GRPC_MESSAGE_BYTES
from pdserve.node.proto_convert import cuda_ipc_to_proto, params_to_proto
from pdserve.openai.engine_protocol import TokenDelta
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc

logger = logging.getLogger("pdserve.decode")

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_BYTES),
]


class PrefillClient:
    """Calls `Node.Prefill` on prefill nodes with this decode node's KV destination."""

    def __init__(self, config: EngineConfig, engine: ZmqEngineClient) -> None:
        assert engine.ready is not None
        self.config = config
        self.engine = engine
        host = config.advertise_host or config.internal_host
        ready = engine.ready
        names = ready.kv_shm_names or [ready.kv_shm_name]
        gpu_pools = ready.kv_cuda_ipc
        # rank r's KV agent listens on cache-queue-port + r, its pool is its own segment (NumPy)
        # or allocation (GPU)
        self.destinations = [
            dict(rank=r, zmq_endpoint=kv_endpoint(host, config.cache_queue_port, r),
                 shm_name=names[r] if r < len(names) else "", host_id=ready.host_id,
                 pool_blocks=ready.num_blocks,
                 **cuda_ipc_to_proto(gpu_pools[r] if r < len(gpu_pools) else None))
            for r in range(config.tensor_parallel_size)
        ]  # fmt: skip
        self.stubs: dict[str, pb_grpc.NodeStub] = {}
        self.channels: list[grpc.aio.Channel] = []

    def stub(self, addr: str) -> pb_grpc.NodeStub:
        if addr not in self.stubs:
            channel = grpc.aio.insecure_channel(addr, options=CHANNEL_OPTIONS)
            self.channels.append(channel)
            self.stubs[addr] = pb_grpc.NodeStub(channel)
        return self.stubs[addr]

    def remote(
        self, request_id: str, prompt: list[int], params: SamplingParams, nodes: list[str]
    ) -> RemotePrefill:
        """The remote-prefill step of one request: try the first node, then the next one."""

        async def run(ready: m.RemoteKVReady) -> RemoteResult:
            errors = []
            for attempt, addr in enumerate(nodes[:2]):  # one retry on another prefill node
                # a retry's frames must not mix with a failed attempt's: a new transfer id
                tid = ready.transfer_id if attempt == 0 else f"{ready.transfer_id}+{attempt}"
                if attempt:
                    await self.engine.retarget(ready.request_id, tid)
                try:
                    return await self._prefill(addr, ready, tid, prompt, params)
                except grpc.aio.AioRpcError as e:
                    logger.warning("prefill of %s on %s failed: %s %s", request_id, addr,
                                   e.code().name, e.details())  # fmt: skip
                    errors.append(f"{addr}: {e.code().name} {e.details()}")
                    await self._stop(addr, request_id)
            return RemoteResult(ok=False, error="; ".join(errors) or "no prefill node")

        return run

    async def _stop(self, addr: str, request_id: str) -> None:
        """Make sure a failed prefill node writes no more into our blocks (through shared
        memory nothing else could stop it) before they are reused; a dead node writes nothing."""
        try:
            await self.stub(addr).Abort(pb.AbortRequest(request_ids=[request_id]), timeout=5)
        except grpc.aio.AioRpcError as e:
            logger.info("abort of %s on %s: %s", request_id, addr, e.code().name)

    async def _prefill(
        self, addr: str, ready: m.RemoteKVReady, tid: str, prompt: list[int],
        params: SamplingParams,
    ) -> RemoteResult:  # fmt: skip
        assert self.engine.ready is not None
        dests = [pb.KVDestination(block_ids=ready.block_ids, **d) for d in self.destinations]
        req = pb.PrefillRequest(
            request_id=ready.request_id, transfer_id=tid, prompt_token_ids=prompt,
            params=params_to_proto(params), eos_token_ids=list(self.engine.eos_token_ids),
            first_block=ready.first_block, destinations=dests,
            kv_dtype=self.engine.ready.kv_dtype, block_size=self.engine.ready.block_size,
            checksum=self.config.kv_checksum,
        )  # fmt: skip
        reply = await self.stub(addr).Prefill(req, timeout=self.config.pd_timeout)
        return RemoteResult(ok=True, token_id=reply.first_token_id, logprob=reply.logprob,
                            kv_bytes=reply.kv_bytes_sent)  # fmt: skip

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


class InHostDisaggClient:
    """The EngineClient of a decode node started with --innode-prefill-ports: it serves clients
    directly, sending each prompt to the in-host prefill node with the fewest queued requests."""

    def __init__(self, engine: ZmqEngineClient, prefill: PrefillClient, nodes: list[str]):
        self.engine = engine
        self.prefill = prefill
        self.nodes = nodes
        self.inflight = dict.fromkeys(nodes, 0)

    @property
    def num_running(self) -> int:
        return self.engine.num_running

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[TokenDelta]:
        order = sorted(self.nodes, key=lambda n: self.inflight[n])
        first = order[0]
        self.inflight[first] += 1
        try:
            remote = self.prefill.remote(request_id, prompt_token_ids, params, order)
            async for delta in self.engine.generate(request_id, prompt_token_ids, params, remote):
                yield delta
        finally:
            self.inflight[first] -= 1

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)


async def discover_innode_prefill(ports: list[int], host: str, timeout_s: float = 30.0):
    """gRPC addresses of the prefill nodes whose engines listen on these
    engine-worker-queue ports (FastDeploy's --innode-prefill-ports)."""
    ctx = zmq.asyncio.Context()
    found = []
    try:
        for port in ports:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"tcp://{host}:{port}")
            deadline = asyncio.get_running_loop().time() + timeout_s
            info = None
            while info is None:  # the prefill node may still be loading its model
                await sock.send(m.encode(m.PeerInfoRequest()))
                if await sock.poll(1000):
                    reply = m.decode(await sock.recv())
                    if isinstance(reply, m.PeerInfo):
                        info = reply
                if asyncio.get_running_loop().time() > deadline:
                    raise ValueError(f"--innode-prefill-ports: no engine answered on {port}")
            sock.close()
            if info.role != "prefill":
                raise ValueError(f"--innode-prefill-ports: the node on {port} is "
                                 f"{info.role}, not prefill")  # fmt: skip
            found.append(f"{info.host}:{info.pd_comm_port}")
    finally:
        ctx.destroy(linger=0)
    return found
