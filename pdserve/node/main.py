"""A node's frontend process: start the engine, serve HTTP, supervise, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket

from aiohttp import web

from pdserve.engine_config import EngineConfig
from pdserve.metrics import NodeMetrics
from pdserve.model.tiny import resolve_model_path
from pdserve.node.engine_client import ZmqEngineClient
from pdserve.node.server import NodeState, build_app, build_metrics_app
from pdserve.openai.serving import OpenAIServing
from pdserve.tokenizer import load_tokenizer

logger = logging.getLogger("pdserve.node")

ATTENTION_BACKENDS = ("APPEND_ATTN", "FLASH_ATTN", "NATIVE_ATTN")
EXIT_ENGINE_DIED = 1


def check_ports(config: EngineConfig) -> None:
    """Fail fast, naming the flag, when a port this node binds is taken."""
    wanted = [("--port", config.host, config.port),
              ("--metrics-port", config.host, config.metrics_port),
              ("--engine-worker-queue-port", config.internal_host,
               config.engine_worker_queue_port)]  # fmt: skip
    seen: dict[int, str] = {}
    for flag, host, port in wanted:
        if port in seen:
            raise ValueError(f"{flag} {port} is the same as {seen[port]}")
        seen[port] = flag
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError as e:
                raise ValueError(f"{flag} {port}: cannot listen on {host} ({e.strerror})") from None


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
    exit_code = 0

    def on_death(code: int) -> None:
        nonlocal exit_code
        state.healthy, state.reason = False, f"engine process died (exit code {code})"
        exit_code = EXIT_ENGINE_DIED
        stop.set()

    engine = ZmqEngineClient(config, tokenizer.eos_token_ids, on_death, metrics)
    await engine.start()
    assert engine.ready is not None
    serving = OpenAIServing(engine, tokenizer, config.model_name, engine.ready.max_model_len,
                            config.max_concurrency)  # fmt: skip
    app = build_app(serving, metrics, state, config.api_key, config.max_request_body_bytes)
    # handler_cancellation: a client that hangs up cancels its handler, which aborts its request
    runner = web.AppRunner(app, handle_signals=False, handler_cancellation=True)
    metrics_runner = web.AppRunner(build_metrics_app(metrics), handle_signals=False)
    await runner.setup()
    await metrics_runner.setup()
    await web.TCPSite(runner, config.host, config.port).start()
    await web.TCPSite(metrics_runner, config.host, config.metrics_port).start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    logger.info("serving %s on http://%s:%d (metrics on :%d), %d KV blocks of %d tokens",
                config.model_name, config.host, config.port, config.metrics_port,
                engine.ready.num_blocks, engine.ready.block_size)  # fmt: skip
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
    await engine.stop(drain_seconds=0.0)
    await runner.cleanup()
    await metrics_runner.cleanup()
    logger.info("node stopped (exit code %d)", exit_code)
    return exit_code
