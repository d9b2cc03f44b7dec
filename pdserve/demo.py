"""`pdserve demo`: a router, one prefill and one decode node on free loopback ports, one streamed
chat request through them with the official openai client, then a clean shutdown.

It walks the whole disaggregated path: HTTP and SSE at the router, gRPC Generate to the decode
node, gRPC Prefill to the prefill node, the prompt's KV pushed layer by layer into the decode
node's blocks (shared memory, both nodes being on this host), and the tokens streamed back.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

DEMO_PROMPT = "Write a haiku about disaggregated serving."


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the node exited with code {proc.returncode} while starting")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("the node did not become healthy in time")


def _start(args: list[str], log_dir: str | None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pdserve.cli", *args],
                            stdout=subprocess.DEVNULL,
                            stderr=None if log_dir else subprocess.DEVNULL)  # fmt: skip


def _metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def _stop(procs: list[subprocess.Popen]) -> list[int]:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(30))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    return codes


def run_demo(model: str = "tiny", prompt: str = DEMO_PROMPT, max_tokens: int = 64) -> int:
    """A router, one prefill and one decode node on free loopback ports; one streamed chat."""
    import logging

    import openai

    for name in ("httpx", "httpx2", "openai"):  # one line per HTTP request is noise here
        logging.getLogger(name).setLevel(logging.WARNING)
    ports = _free_ports(13)
    log_dir = os.environ.get("FD_LOG_DIR")

    def node_args(role: str, p: list[int]) -> list[str]:
        return ["serve", "--model", model, "--splitwise-role", role, "--port", str(p[0]),
                "--metrics-port", str(p[1]), "--engine-worker-queue-port", str(p[2]),
                "--cache-queue-port", str(p[3]), "--pd-comm-port", str(p[4])]  # fmt: skip

    prefill_ports, decode_ports, (router_port, router_grpc, router_metrics) = (
        ports[0:5], ports[5:10], ports[10:13])  # fmt: skip
    print(f"starting a prefill node (gRPC :{prefill_ports[4]}), a decode node (gRPC "
          f":{decode_ports[4]}) and a router on 127.0.0.1:{router_port} (model {model})",
          file=sys.stderr)  # fmt: skip
    nodes = [_start(node_args("prefill", prefill_ports), log_dir),
             _start(node_args("decode", decode_ports), log_dir)]  # fmt: skip
    router = _start(["router", "--model", model, "--port", str(router_port),
                     "--pd-comm-port", str(router_grpc), "--metrics-port", str(router_metrics),
                     "--prefill-nodes", f"127.0.0.1:{prefill_ports[4]}",
                     "--decode-nodes", f"127.0.0.1:{decode_ports[4]}"], log_dir)  # fmt: skip
    url = f"http://127.0.0.1:{router_port}"
    try:
        for proc, port in ((nodes[0], prefill_ports[0]), (nodes[1], decode_ports[0]),
                           (router, router_port)):  # fmt: skip
            _wait_healthy(f"http://127.0.0.1:{port}", proc, timeout=120)
        client = openai.OpenAI(base_url=url + "/v1", api_key="demo", max_retries=0)
        print(f"> {prompt}", file=sys.stderr)
        start = time.perf_counter()
        first = None
        usage = None
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
            stream=True, stream_options={"include_usage": True},
        )  # fmt: skip
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta.content:
                    first = first or time.perf_counter()
                    sys.stdout.write(choice.delta.content)
                    sys.stdout.flush()
        end = time.perf_counter()
        print()
        n = usage.completion_tokens if usage else 0
        ttft = ((first or end) - start) * 1e3
        rate = (n - 1) / (end - first) if first and n > 1 and end > first else 0.0
        moved = _metric(f"http://127.0.0.1:{decode_ports[0]}", "pdserve:kv_bytes_received_total")
        print(f"[{usage.prompt_tokens if usage else '?'} prompt tokens, {n} generated; "
              f"TTFT {ttft:.1f} ms, {rate:.1f} tokens/s; KV moved prefill -> decode: "
              f"{moved / 1024:.1f} KiB]", file=sys.stderr)  # fmt: skip
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        codes = _stop([router]) + _stop(nodes)
        print(f"stopped router and nodes (exit codes {codes})", file=sys.stderr)
