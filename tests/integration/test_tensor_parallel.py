"""--tensor-parallel-size with real worker processes: a node's ranks give exactly a TP 1 node's
greedy tokens, mixed and disaggregated (rank r's KV shard pushed to decode rank r over shared
memory and ZeroMQ), and a dead worker takes its node down cleanly."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.integration.test_disagg import COMMON
from tests.integration.test_mixed_node import PROMPTS, complete_all

N = 16


@pytest.fixture(scope="module")
def mixed_outputs(node) -> list[str]:
    return complete_all(node, PROMPTS[:N])


def tp(size: int) -> tuple[str, ...]:
    return ("--tensor-parallel-size", str(size))


@pytest.mark.parametrize("size", [2, 4])
def test_mixed_node_matches_tp1(node_factory, mixed_outputs, size):
    """TP 4 on the tiny model (2 KV heads) replicates each KV head on two ranks."""
    node = node_factory(*tp(size), *COMMON)
    assert complete_all(node, PROMPTS[:N]) == mixed_outputs
    assert f"tensor parallel {size}" in node.log()
    assert len(worker_pids(node)) == size - 1
    node.wait_blocks_free()


@pytest.mark.parametrize("protocol", ["ipc,zmq", "zmq"], ids=["shm", "zmq"])
def test_innode_1p1d_tp2_matches_mixed(node_factory, mixed_outputs, protocol):
    prefill = node_factory("--splitwise-role", "prefill", *tp(2),
                           "--cache-transfer-protocol", protocol, *COMMON)  # fmt: skip
    decode = node_factory("--splitwise-role", "decode", *tp(2), "--innode-prefill-ports",
                          str(prefill.engine_port), *COMMON)  # fmt: skip
    assert complete_all(decode, PROMPTS[:N]) == mixed_outputs
    assert decode.metric("pd_fallback_total") == 0
    received = decode.metric("kv_bytes_received_total")
    assert received > 0 and prefill.metric("kv_bytes_sent_total") == received
    transport = "ipc" if protocol.startswith("ipc") else "zmq"
    assert prefill.metric(f'kv_transfers_total{{transport="{transport}"}}') == N
    decode.wait_blocks_free()
    prefill.wait_blocks_free()


def test_prefill_and_decode_tp_sizes_must_match(node_factory, mixed_outputs):
    """A TP 2 prefill node refuses a TP 1 decode node's destinations; the decode node
    recomputes locally (--pd-fallback local), says so, and the tokens stay the same."""
    prefill = node_factory("--splitwise-role", "prefill", *tp(2), *COMMON)
    decode = node_factory("--splitwise-role", "decode", "--innode-prefill-ports",
                          str(prefill.engine_port), *COMMON)  # fmt: skip
    assert complete_all(decode, PROMPTS[:4]) == mixed_outputs[:4]
    assert decode.metric("pd_fallback_total") == 4
    assert "2 tensor-parallel ranks" in decode.log()
    decode.wait_blocks_free()
    prefill.wait_blocks_free()


def test_a_dead_worker_fails_the_node(node_factory):
    node = node_factory(*tp(2), *COMMON)
    assert complete_all(node, PROMPTS[:2])
    (pid,) = worker_pids(node)
    os.kill(pid, signal.SIGKILL)
    assert node.proc.wait(timeout=30) == 1  # a supervisor restarts it
    assert "tensor-parallel" in node.log()


def test_size_the_model_cannot_split_names_the_flag(node_factory):
    with pytest.raises(RuntimeError, match="--tensor-parallel-size 3"):
        node_factory(*tp(3))


def worker_pids(node) -> list[int]:
    """Worker processes of this node: their config names its HTTP port."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"pdserve.engine.worker" in cmd and any(f'"port": {node.port},'.encode() in a
                                                   for a in cmd):  # fmt: skip
            found.append(int(proc.name))
    return found


def test_the_api_key_stays_in_the_frontend(node_factory):
    """Command lines are readable by every local user: only the one the user typed has it."""
    key = "sk-tp-secret-1234"
    node = node_factory(*tp(2), *COMMON, api_key=key)
    holders = []
    for proc in Path("/proc").iterdir():
        try:
            if key.encode() in (proc / "cmdline").read_bytes():
                holders.append(int(proc.name))
        except OSError:
            continue
    assert holders == [node.proc.pid]
    assert len(worker_pids(node)) == 1
