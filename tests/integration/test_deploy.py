"""The launch scripts under deploy/: syntax, a real run of the local 1P1D script (two nodes, one
chat request, clean SIGTERM stop), the guide script on the CPU, and multi_host.sh's dry run."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from openai.types.chat import ChatCompletion

from pdserve.cli import build_parser
from tests.integration.conftest import free_port_range

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SCRIPTS = sorted(DEPLOY.glob("*.sh"))
RUN_TIMEOUT_S = 120

needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="the scripts use curl")


def script_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a script run: this interpreter's pdserve, logs under tmp_path."""
    bin_dir = os.path.dirname(sys.executable)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
            "PYTHON": sys.executable, "LOG_ROOT": str(tmp_path / "logs"), **extra}  # fmt: skip


def run_script(args: list[str], env: dict[str, str],
               timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:  # fmt: skip
    """Run a script in its own process group; on timeout stop the whole group (the script's
    nodes included) with SIGTERM, then SIGKILL, and fail with what it wrote."""
    proc = subprocess.Popen(["bash", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        pytest.fail(f"{args} ran over {timeout} s\nstdout:\n{out}\nstderr:\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def assert_chat_completion(stdout: str) -> ChatCompletion:
    """stdout is exactly one OpenAI chat completion with non-empty assistant content."""
    completion = ChatCompletion.model_validate(json.loads(stdout))
    assert completion.object == "chat.completion"
    assert completion.choices, "no choices"
    message = completion.choices[0].message
    assert message.role == "assistant"
    assert message.content, "empty content"
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    return completion


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_scripts_parse(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_scripts_pass_shellcheck():
    result = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], cwd=REPO,
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


@needs_curl
def test_local_1p1d(tmp_path):
    base = free_port_range(10)  # the guide's 8 ports and the two gRPC ports pdserve adds
    result = run_script(["deploy/local_1p1d.sh"], script_env(tmp_path, BASE_PORT=str(base)))
    assert result.returncode == 0, result.stderr
    assert_chat_completion(result.stdout)
    # both nodes drained and exited 0 on SIGTERM, each logging into its own FD_LOG_DIR
    assert "decode stopped (exit code 0)" in result.stderr
    assert "prefill stopped (exit code 0)" in result.stderr
    for role in ("prefill", "decode"):
        node_log = (tmp_path / "logs" / f"log_{role}" / "node.log").read_text()
        assert f"as {role}" in node_log
        assert "node stopped (exit code 0)" in node_log
    decode_log = (tmp_path / "logs" / "log_decode" / "node.log").read_text()
    assert "POST /v1/chat/completions" in decode_log  # the client called the decode node


@needs_curl
def test_local_1p1d_fails_when_a_node_cannot_start(tmp_path):
    base = free_port_range(10)
    with socket.socket() as taken:  # the decode node's engine-worker-queue port
        taken.bind(("127.0.0.1", base + 6))
        taken.listen()
        result = run_script(["deploy/local_1p1d.sh"], script_env(tmp_path, BASE_PORT=str(base)))
    assert result.returncode != 0
    assert "decode exited before it became healthy" in result.stderr
    assert "--engine-worker-queue-port" in result.stderr  # the node's own reason is shown
    assert "prefill stopped (exit code 0)" in result.stderr  # the other node was stopped
    assert result.stdout == ""


@needs_curl
@pytest.mark.parametrize("quant", ["wint4", "block_wise_fp8"])
def test_guide_8gpu_1p1d_on_cpu(tmp_path, quant):
    """The guide's commands as they are (TP 4 on each node, its quantization), on `tiny`."""
    base = free_port_range(13)  # 8 ports, the decode node's 3 more KV ranks, 2 gRPC ports
    env = script_env(tmp_path, MODEL="tiny", QUANT=quant, ONESHOT="1", BASE_PORT=str(base))
    result = run_script(["deploy/guide_8gpu_1p1d.sh"], env)
    assert result.returncode == 0, result.stderr
    assert_chat_completion(result.stdout)
    logs = tmp_path / "logs"
    for role in ("prefill", "decode"):
        assert "tensor parallel 4" in (logs / f"log_{role}" / "engine.log").read_text()
    assert "pd fallback" not in (logs / "log_decode" / "engine.log").read_text()


def test_multi_host_dry_run_decode(tmp_path):
    env = script_env(tmp_path, DRY_RUN="1")
    env.pop("ROUTER_HOST", None)
    result = run_script(["deploy/multi_host.sh", "decode"], env, timeout=30)
    assert result.returncode == 0, result.stderr
    command = result.stdout.strip().splitlines()[-1]
    assert "--splitwise-role decode" in command
    assert "--router ROUTER_HOST:8010" in command
    assert "--internal-host" in command and "--advertise-host" in command
    # the printed command is one that pdserve accepts
    argv = shlex.split(command)
    assert argv[:2] == ["pdserve", "serve"]
    build_parser().parse_args(argv[1:])


def test_multi_host_dry_run_every_role(tmp_path):
    env = script_env(tmp_path, DRY_RUN="1", NODE_IP="10.0.0.2", ROUTER_HOST="10.0.0.1",
                     TP="4", QUANT="wint4", API_KEY="sekrit")  # fmt: skip
    for role, instance in (("router", "0"), ("prefill", "1"), ("decode", "0")):
        result = run_script(["deploy/multi_host.sh", role, instance], env, timeout=30)
        assert result.returncode == 0, result.stderr
        assert "sekrit" not in result.stdout  # the key is printed as "$API_KEY"
        lines = result.stdout.strip().splitlines()
        argv = shlex.split(lines[-1])
        build_parser().parse_args(argv[1:])
        if role == "router":
            assert argv[:2] == ["pdserve", "router"]
            assert "--internal-host 10.0.0.2 --pd-comm-port 8010" in lines[-1]
        else:
            assert f"--splitwise-role {role}" in lines[-1]
            assert "--advertise-host 10.0.0.2 --router 10.0.0.1:8010" in lines[-1]
            assert "--tensor-parallel-size 4" in lines[-1] and "--quantization wint4" in lines[-1]
    # prefill instance 1 of TP 4: the second group of GPUs and the second block of ports
    assert "export CUDA_VISIBLE_DEVICES=4,5,6,7" in run_script(
        ["deploy/multi_host.sh", "prefill", "1"], env, timeout=30).stdout  # fmt: skip


def test_multi_host_rejects_unknown_role(tmp_path):
    result = run_script(["deploy/multi_host.sh", "mixed"], script_env(tmp_path), timeout=30)
    assert result.returncode != 0
    assert "use router, prefill or decode" in result.stderr


def env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


@pytest.mark.parametrize("path", sorted((DEPLOY / "systemd" / "examples").glob("*.env")),
                         ids=lambda p: p.name)  # fmt: skip
def test_systemd_examples_use_real_flags(path):
    values = env_file(path)
    if path.name == "router.env":
        build_parser().parse_args(["router", *values["PDSERVE_ROUTER_ARGS"].split()])
    else:
        build_parser().parse_args(["serve", *values["PDSERVE_ARGS"].split()])


def test_systemd_units():
    node = (DEPLOY / "systemd" / "pdserve-node@.service").read_text()
    router = (DEPLOY / "systemd" / "pdserve-router.service").read_text()
    for unit in (node, router):
        assert "Restart=on-failure" in unit and "KillSignal=SIGTERM" in unit
    assert "EnvironmentFile=/etc/pdserve/%i.env" in node
    assert "EnvironmentFile=/etc/pdserve/router.env" in router
    graceful = re.search(r"^ExecStart=.* --timeout-graceful-shutdown (\d+)", node, re.M)
    stop = re.search(r"^TimeoutStopSec=(\d+)$", node, re.M)
    assert graceful and stop and int(stop.group(1)) > int(graceful.group(1))
