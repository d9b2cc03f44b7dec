"""Real node processes on free loopback ports, driven with the official openai client."""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import openai
import pytest

START_TIMEOUT_S = 60


def http(method: str, url: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, str]:  # fmt: skip
    """(status, body text) of a plain HTTP request, errors included."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out to sockets bound to port 0 or connecting."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port_range(n: int, avoid: frozenset[int] = frozenset()) -> int:
    """A base port b with b..b+n-1 all free on 127.0.0.1 (when checked) and none in `avoid`.
    Drawn below the ephemeral range: a port in it that is free when checked can still go to
    another process's outgoing connection before the node binds it."""
    rng = random.Random()
    top = max(12000, min(_ephemeral_low(), 65536)) - n
    for _ in range(200):
        base = rng.randrange(10000, top)
        if avoid & set(range(base, base + n)):
            continue
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports found")


@dataclass
class Node:
    proc: subprocess.Popen
    port: int
    metrics_port: int
    api_key: str | None = None
    log_path: str | None = None
    engine_port: int = 0  # --engine-worker-queue-port
    grpc_port: int = 0  # --pd-comm-port

    def log(self) -> str:
        """What the node wrote to stderr so far."""
        if self.log_path is None:
            return ""
        with open(self.log_path) as f:
            return f.read()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.api_key or "unused",
                             max_retries=0, timeout=60, **kw)  # fmt: skip

    def async_client(self, **kw) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=self.api_key or "unused",
                                  max_retries=0, timeout=60, **kw)  # fmt: skip

    def remove_log(self) -> None:
        if self.log_path is not None:
            os.unlink(self.log_path)
            self.log_path = None

    def metric(self, name: str) -> float:
        _, text = http("GET", f"http://127.0.0.1:{self.metrics_port}/metrics")
        labels = "" if "{" in name else r"(?:\{[^}]*\})?"  # a name may give its labels
        match = re.search(rf"^pdserve:{re.escape(name)}{labels} (\S+)$", text, re.M)
        assert match, f"metric {name} not exported"
        return float(match.group(1))

    def wait_blocks_free(self, timeout: float = 10.0) -> None:
        """Every KV block back in the free list (the engine reports every 0.5 s when idle)."""
        deadline = time.monotonic() + timeout
        while True:
            free, total = self.metric("kv_free_blocks"), self.metric("kv_total_blocks")
            if free == total and self.metric("num_requests_running") == 0:
                return
            assert time.monotonic() < deadline, f"{total - free:.0f} KV blocks never came back"
            time.sleep(0.2)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


NODE_ENTRY = ("pdserve.cli", "serve")


def start_node(
    *args: str,
    env: dict[str, str] | None = None,
    api_key: str | None = None,
    entry: tuple[str, ...] = NODE_ENTRY,
) -> Node:
    """A healthy `pdserve serve --model tiny` (or another entry module) on free ports."""
    port, metrics_port, eq, pd = free_ports(4)
    # a decode node's rank r listens on the cache-queue port + r: keep 4 ranks' ports free
    cq = free_port_range(4, avoid=frozenset((port, metrics_port, eq, pd)))
    cmd = [sys.executable, "-m", *entry, "--model", "tiny",
           "--port", str(port), "--metrics-port", str(metrics_port),
           "--engine-worker-queue-port", str(eq), "--cache-queue-port", str(cq),
           "--pd-comm-port", str(pd), *args]  # fmt: skip
    if api_key:
        cmd += ["--api-key", api_key]
    # the node's log goes to a file: a pipe nobody reads would stall a chatty node
    with tempfile.NamedTemporaryFile("w", prefix="pdserve-node-", suffix=".log",
                                     delete=False) as log:  # fmt: skip
        proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})},
                                stdout=subprocess.DEVNULL, stderr=log)  # fmt: skip
    node = Node(proc, port, metrics_port, api_key, log.name, eq, pd)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"node exited with {proc.returncode}: {node.log()}")
        try:
            if http("GET", node.url + "/health")[0] == 200:
                return node
        except OSError:
            pass
        if time.monotonic() > deadline:
            node.stop(signal.SIGKILL)
            raise RuntimeError("node did not become healthy")
        time.sleep(0.1)


@pytest.fixture
def node_factory() -> Iterator:
    nodes: list[Node] = []

    def make(*args: str, **kw) -> Node:
        nodes.append(start_node(*args, **kw))
        return nodes[-1]

    yield make
    for n in nodes:
        if n.proc.poll() is None:
            n.stop(signal.SIGKILL)
        n.remove_log()


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    n = start_node("--max-num-seqs", "64", "--num-gpu-blocks-override", "512",
                   "--block-size", "16")  # fmt: skip
    yield n
    assert n.stop() == 0, "SIGTERM must drain and exit 0"
    n.remove_log()
