"""`pdserve router`: the OpenAI API in front of prefill, decode and mixed nodes."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from dataclasses import dataclass

import grpc
from aiohttp import web

from pdserve.metrics import NodeMetrics
from pdserve.model.tiny import resolve_model_path
from pdserve.node.grpc_service import HealthService
from pdserve.node.grpc_service import grpc_server as make_grpc_server
from pdserve.node.server import NodeState, build_app, build_metrics_app
from pdserve.openai.serving import OpenAIServing
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.router.client import RouterEngineClient
from pdserve.router.registry import HEARTBEAT_INTERVAL_S, Registry
from pdserve.tokenizer import load_tokenizer

logger = logging.getLogger("pdserve.router")

POLL_INTERVAL_S = 0.5
NODE_WAIT_S = 120.0


@dataclass(frozen=True)
class RouterConfig:
    model: str
    host: str
    port: int
    metrics_port: int | None
    pd_comm_port: int
    internal_host: str
    prefill_nodes: tuple[str, ...]
    decode_nodes: tuple[str, ...]
    mixed_nodes: tuple[str, ...]
    api_key: str | None
    max_concurrency: int
    max_request_body_bytes: int

    @classmethod
    def add_cli_args(cls, p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default="tiny", help="the model (its tokenizer is used)")
        p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model)")
        p.add_argument("--host", default="127.0.0.1", help="HTTP bind address")
        p.add_argument("--port", type=int, default=8000, help="OpenAI HTTP API port")
        p.add_argument("--metrics-port", type=int, default=None, help="extra /metrics port")
        p.add_argument(
            "--pd-comm-port",
            type=int,
            default=8010,
            help="gRPC port nodes register with (--router on a node)",
        )
        p.add_argument("--internal-host", default="127.0.0.1", help="gRPC bind address")
        for role in ("prefill", "decode", "mixed"):
            p.add_argument(
                f"--{role}-nodes",
                default="",
                help=f"{role} nodes' gRPC HOST:PORT (--pd-comm-port), comma-separated",
            )
        p.add_argument(
            "--api-key", default=None, help="bearer token required on the HTTP API (or FD_API_KEY)"
        )
        p.add_argument("--max-concurrency", type=int, default=1024, help="requests in flight")
        p.add_argument("--max-request-body-bytes", type=int, default=16 * 1024 * 1024)

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> RouterConfig:
        def nodes(s: str, flag: str) -> tuple[str, ...]:
            out = tuple(x.strip() for x in s.split(",") if x.strip())
            for x in out:
                host, _, port = x.rpartition(":")
                if not host or not port.isdigit():
                    raise ValueError(f"{flag}: {x!r} is not HOST:PORT")
            return out

        return cls(a.tokenizer or a.model, a.host, a.port, a.metrics_port, a.pd_comm_port,
                   a.internal_host, nodes(a.prefill_nodes, "--prefill-nodes"),
                   nodes(a.decode_nodes, "--decode-nodes"), nodes(a.mixed_nodes, "--mixed-nodes"),
                   a.api_key or os.environ.get("FD_API_KEY") or None, a.max_concurrency,
                   a.max_request_body_bytes)  # fmt: skip


class RouterService(pb_grpc.RouterServicer):
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    async def Register(self, request: pb.NodeInfo, context) -> pb.RegisterReply:  # noqa: N802
        addr = f"{request.advertise_host or request.host}:{request.pd_comm_port}"
        reason = self.registry.add(addr, request, static=False)
        return pb.RegisterReply(accepted=not reason, message=reason,
                                heartbeat_interval_s=HEARTBEAT_INTERVAL_S)  # fmt: skip

    async def Heartbeat(self, request: pb.HeartbeatRequest, context) -> pb.HeartbeatReply:  # noqa: N802
        return pb.HeartbeatReply(known=self.registry.heartbeat(request.node_id, request.load))


async def _join_static(registry: Registry, addrs: list[str]) -> None:
    """Wait for each statically listed node to answer GetInfo, then add it."""
    deadline = asyncio.get_running_loop().time() + NODE_WAIT_S
    for addr in addrs:
        async with grpc.aio.insecure_channel(addr) as channel:
            stub = pb_grpc.NodeStub(channel)
            while True:
                try:
                    info = await stub.GetInfo(pb.InfoRequest(), timeout=2)
                    break
                except grpc.aio.AioRpcError:
                    if asyncio.get_running_loop().time() > deadline:
                        msg = f"node {addr} did not answer in {NODE_WAIT_S:.0f} s"
                        raise ValueError(msg) from None
                    await asyncio.sleep(0.2)
        if reason := registry.add(addr, info, static=True):
            raise ValueError(f"node {addr} refused: {reason}")


async def _poll_loads(registry: Registry) -> None:
    while True:
        await asyncio.sleep(POLL_INTERVAL_S)
        await registry.expire()
        for node in list(registry.nodes.values()):
            try:
                node.load = await node.stub.GetLoad(pb.LoadRequest(), timeout=2)
                node.failures = 0
            except grpc.aio.AioRpcError:
                node.failures += 1


async def serve_router(config: RouterConfig) -> int:
    tokenizer = load_tokenizer(resolve_model_path(config.model))
    registry = Registry(tokenizer.fingerprint)
    metrics, state = NodeMetrics(), NodeState()
    grpc_server = make_grpc_server(HealthService(lambda: state.healthy and not state.draining))
    pb_grpc.add_RouterServicer_to_server(RouterService(registry), grpc_server)
    if grpc_server.add_insecure_port(f"{config.internal_host}:{config.pd_comm_port}") == 0:
        raise ValueError(f"--pd-comm-port {config.pd_comm_port}: cannot listen")
    await grpc_server.start()
    await _join_static(registry, [*config.prefill_nodes, *config.decode_nodes,
                                  *config.mixed_nodes])  # fmt: skip
    deadline = asyncio.get_running_loop().time() + NODE_WAIT_S
    while not (registry.healthy("decode") or registry.healthy("mixed")):
        if asyncio.get_running_loop().time() > deadline:
            raise ValueError("no decode or mixed node joined the router")
        await asyncio.sleep(0.2)
    ref = registry.reference
    assert ref is not None
    client = RouterEngineClient(registry, tokenizer.eos_token_ids, metrics)
    serving = OpenAIServing(client, tokenizer, config.model, ref.max_model_len,
                            config.max_concurrency)  # fmt: skip
    app = build_app(serving, metrics, state, config.api_key, config.max_request_body_bytes)

    async def nodes_handler(request: web.Request) -> web.Response:
        return web.json_response({"nodes": [n.as_json() for n in registry.nodes.values()]})

    app.router.add_get("/nodes", nodes_handler)
    runner = web.AppRunner(app, handle_signals=False, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, config.host, config.port).start()
    metrics_runner = None
    if config.metrics_port:
        metrics_runner = web.AppRunner(build_metrics_app(metrics), handle_signals=False)
        await metrics_runner.setup()
        await web.TCPSite(metrics_runner, config.host, config.metrics_port).start()
    poller = asyncio.create_task(_poll_loads(registry))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    logger.info("router on http://%s:%d with %d nodes", config.host, config.port,
                len(registry.nodes))  # fmt: skip
    await stop.wait()
    state.draining, state.reason = True, "shutting down"
    poller.cancel()
    await runner.cleanup()
    if metrics_runner is not None:
        await metrics_runner.cleanup()
    await grpc_server.stop(grace=1.0)
    await registry.close()
    return 0
