"""A node's frontend process: start the engine, serve HTTP, supervise, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import signal
import socket
import uuid
from pathlib import Path

import grpc
from aiohttp import web

from pdserve.decode_node.prefill_client import (
    InHostDisaggClient,
    PrefillClient,
    discover_innode_prefill,
)
from pdserve.engine_config import EngineConfig
from pdserve.metrics import NodeMetrics
from pdserve.model.tiny import resolve_model_path
from pdserve.node.engine_client import ZmqEngineClient
from pdserve.node.grpc_service import HealthService, NodeService
from pdserve.node.grpc_service import grpc_server as grpc_server_for
from pdserve.node.proto_convert import load_info
from pdserve.node.server import NodeState, build_app, build_metrics_app
from pdserve.openai.engine_protocol import EngineClient
from pdserve.openai.serving import OpenAIServing
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.tokenizer import load_tokenizer

logger = logging.getLogger("pdserve.node")

ATTENTION_BACKENDS = ("APPEND_ATTN", "FLASH_ATTN", "NATIVE_ATTN")
EXIT_ENGINE_DIED = 1


def check_ports(config: EngineConfig) -> None:
    """Fail fast, naming the flag, when a port this node binds is taken."""
    wanted = [("--port", config.host, config.port),
              ("--metrics-port", config.host, config.metrics_port),
              ("--engine-worker-queue-port", config.internal_host,
               config.engine_worker_queue_port),
              ("--pd-comm-port", config.internal_host, config.pd_comm_port)]  # fmt: skip
    wanted = [w for w in wanted if w[2]]  # an unset --pd-comm-port takes a free port
    if config.splitwise_role == "decode":  # rank r's KV agent listens on the port + r
        for r in range(config.tensor_parallel_size):
            flag = "--cache-queue-port" + (f" + rank {r}" if r else "")
            wanted.append((flag, config.internal_host, config.cache_queue_port + r))
    seen: dict[int, str] = {}
    for flag, host, port in wanted:
        if port in seen:
            raise ValueError(f"{flag} {port} is the same as {seen[port]}")
        seen[port] = flag
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            # as servers do: a port whose old connections linger in TIME_WAIT is free
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                raise ValueError(f"{flag} {port}: cannot listen on {host} ({e.strerror})") from None


def node_info(config: EngineConfig, engine: ZmqEngineClient, tokenizer_fp: str) -> pb.NodeInfo:
    """What peers and routers learn about this node (and check before pairing with it)."""
    assert engine.ready is not None
    model_dir = resolve_model_path(config.model)
    return pb.NodeInfo(
        node_id=f"{config.splitwise_role}-{uuid.uuid4().hex[:8]}", role=config.splitwise_role,
        host=config.host, advertise_host=config.advertise_host or config.internal_host,
        http_port=config.port, pd_comm_port=config.pd_comm_port,
        engine_worker_queue_port=config.engine_worker_queue_port,
        cache_queue_port=config.cache_queue_port, tp_size=config.tensor_parallel_size,
        backend=engine.ready.backend or config.backend, block_size=engine.ready.block_size,
        kv_dtype=engine.ready.kv_dtype,
        # nodes must compute the same KV: the weights and how they are quantized
        model_fingerprint=f"{model_fingerprint(model_dir)}/{config.quantization or 'none'}",
        tokenizer_fingerprint=tokenizer_fp, num_blocks=engine.ready.num_blocks,
        host_id=engine.ready.host_id, max_model_len=engine.ready.max_model_len,
    )  # fmt: skip


async def register_loop(router: str, info: pb.NodeInfo, engine: ZmqEngineClient) -> None:
    """Register with the router (--router) and heartbeat the engine's load to it."""
    async with grpc.aio.insecure_channel(router) as channel:
        stub = pb_grpc.RouterStub(channel)
        known = False
        while True:
            try:
                if not known:
                    reply = await stub.Register(info, timeout=5)
                    if not reply.accepted:
                        logger.error("router %s refused this node: %s", router, reply.message)
                        return
                    interval, known = reply.heartbeat_interval_s or 1.0, True
                    logger.info("registered with router %s", router)
                load = load_info(engine.stats)
                hb = await stub.Heartbeat(pb.HeartbeatRequest(node_id=info.node_id, load=load),
                                          timeout=5)  # fmt: skip
                known = hb.known
                await asyncio.sleep(interval)
            except grpc.aio.AioRpcError as e:
                logger.warning("router %s unreachable (%s); retrying", router, e.code().name)
                known = False
                await asyncio.sleep(1.0)


def model_fingerprint(model_dir: Path) -> str:
    """sha256 of config.json and the checkpoint's tensor table: equal means the same model."""
    digest = hashlib.sha256((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")):
        with f.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            digest.update(fh.read(min(n, 100 << 20)))
    return digest.hexdigest()


def check_environment() -> None:
    backend = os.environ.get("FD_ATTENTION_BACKEND")
    if backend is not None:
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"FD_ATTENTION_BACKEND={backend!r} is not one of "
                             f"{', '.join(ATTENTION_BACKENDS)}")  # fmt: skip
        logger.info("FD_ATTENTION_BACKEND=%s accepted; pdserve uses its own paged attention",
                    backend)  # fmt: skip


async def serve(config: EngineConfig) -> int:
    """Run a mixed node until SIGTERM/SIGINT (exit 0 after draining) or engine death (exit 1)."""
    check_environment()
    check_ports(config)
    tokenizer = load_tokenizer(resolve_model_path(config.model))
    metrics = NodeMetrics()
    state = NodeState()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):  # from the start: a SIGTERM while loading drains
        loop.add_signal_handler(sig, stop.set)
    exit_code = 0

    def on_death(code: int) -> None:
        nonlocal exit_code
        state.healthy, state.reason = False, f"engine process died (exit code {code})"
        exit_code = EXIT_ENGINE_DIED
        stop.set()

    # gRPC binds first: without --pd-comm-port it takes a free port, which the engine (in-host
    # discovery) and NodeInfo (the router) must report
    grpc_server = grpc_server_for(HealthService(lambda: state.healthy and not state.draining))
    port = grpc_server.add_insecure_port(f"{config.internal_host}:{config.pd_comm_port or 0}")
    if port == 0:
        raise ValueError(f"--pd-comm-port {config.pd_comm_port}: cannot listen")
    config = dataclasses.replace(config, pd_comm_port=port)
    engine = ZmqEngineClient(config, tokenizer.eos_token_ids, on_death, metrics)
    await engine.start()
    assert engine.ready is not None
    info = node_info(config, engine, tokenizer.fingerprint)
    prefill_client = None
    front: EngineClient = engine
    if config.splitwise_role == "decode":
        prefill_client = PrefillClient(config, engine)
        if config.innode_prefill_ports:
            ports = [int(p) for p in config.innode_prefill_ports.split(",") if p.strip()]
            nodes = await discover_innode_prefill(ports, config.internal_host)
            logger.info("in-host prefill nodes: %s", ", ".join(nodes))
            front = InHostDisaggClient(engine, prefill_client, nodes)
    service = NodeService(config, engine, info, prefill_client.remote if prefill_client else None)
    pb_grpc.add_NodeServicer_to_server(service, grpc_server)
    await grpc_server.start()
    registration = (
        asyncio.create_task(register_loop(config.router, info, engine)) if (config.router) else None
    )
    serving = OpenAIServing(front, tokenizer, config.model_name, engine.ready.max_model_len,
                            config.max_concurrency)  # fmt: skip
    app = build_app(serving, metrics, state, config.api_key, config.max_request_body_bytes)
    # handler_cancellation: a client that hangs up cancels its handler, which aborts its request
    runner = web.AppRunner(app, handle_signals=False, handler_cancellation=True)
    metrics_runner = web.AppRunner(build_metrics_app(metrics), handle_signals=False)
    await runner.setup()
    await metrics_runner.setup()
    await web.TCPSite(runner, config.host, config.port).start()
    await web.TCPSite(metrics_runner, config.host, config.metrics_port).start()
    logger.info("serving %s as %s on http://%s:%d (metrics :%d, gRPC :%d), %d KV blocks of %d "
                "tokens", config.model_name, config.splitwise_role, config.host, config.port,
                config.metrics_port, config.pd_comm_port, engine.ready.num_blocks,
                engine.ready.block_size)  # fmt: skip
    await stop.wait()
    if exit_code == 0:
        state.draining, state.reason = True, "shutting down"
        logger.info("draining %d requests (up to %.0f s)", engine.num_running,
                    config.timeout_graceful_shutdown)  # fmt: skip
        deadline = loop.time() + config.timeout_graceful_shutdown
        while engine.num_running and loop.time() < deadline:
            await asyncio.sleep(0.05)
    else:
        await asyncio.sleep(0.2)  # let failing streams write their error events
    if registration is not None:
        registration.cancel()
    await grpc_server.stop(grace=1.0)
    if prefill_client is not None:
        await prefill_client.close()
    await engine.stop(drain_seconds=0.0)
    await runner.cleanup()
    await metrics_runner.cleanup()
    logger.info("node stopped (exit code %d)", exit_code)
    return exit_code
