"""`pdserve demo`: start a node on free ports, stream one chat request through it, stop it.

Until the router and prefill/decode nodes exist, the demo runs one mixed node; it shows the real
request path: HTTP and SSE, the frontend, the engine process and its ZeroMQ sockets.
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


def run_demo(model: str = "tiny", prompt: str = DEMO_PROMPT, max_tokens: int = 64) -> int:
    import logging

    import openai

    for name in ("httpx", "httpx2", "openai"):  # one line per HTTP request is noise here
        logging.getLogger(name).setLevel(logging.WARNING)
    port, metrics_port, eq, cq, pd = _free_ports(5)
    cmd = [sys.executable, "-m", "pdserve.cli", "serve", "--model", model, "--port", str(port),
           "--metrics-port", str(metrics_port), "--engine-worker-queue-port", str(eq),
           "--cache-queue-port", str(cq), "--pd-comm-port", str(pd)]  # fmt: skip
    log_dir = os.environ.get("FD_LOG_DIR")
    print(f"starting a mixed node on 127.0.0.1:{port} (model {model})", file=sys.stderr)
    node = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                            stderr=None if log_dir else subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, node, timeout=120)
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
        print(f"[{usage.prompt_tokens if usage else '?'} prompt tokens, {n} generated; "
              f"TTFT {ttft:.1f} ms, {rate:.1f} tokens/s]", file=sys.stderr)  # fmt: skip
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        if node.poll() is None:
            node.send_signal(signal.SIGTERM)
            try:
                node.wait(30)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
        print(f"node stopped (exit code {node.returncode})", file=sys.stderr)
