"""`pdserve generate` as a user runs it: a real subprocess, real files, printed text."""

from __future__ import annotations

import os
import subprocess
import sys

from pdserve.engine.llm import LLM
from pdserve.engine.sampling_params import SamplingParams


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pdserve.cli", *args], capture_output=True, text=True,
        timeout=120, env={**os.environ},
    )  # fmt: skip


def expected_greedy(prompt: str, n: int) -> str:
    llm = LLM("tiny", backend="numpy", progress=False)
    ids = llm.tokenizer.encode(prompt, add_special_tokens=True)
    toks = llm.generate_all([ids], [SamplingParams(max_tokens=n, temperature=0)])[0]
    return llm.tokenizer.decode(toks)


def test_generate_prints_the_greedy_completion():
    proc = run("generate", "--model", "tiny", "--prompt", "hello", "--temperature", "0",
               "--max-tokens", "24")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected_greedy("hello", 24) + "\n"
    assert "24 generated, finish_reason=length" in proc.stderr


def test_generate_same_seed_same_text_and_chat_mode():
    args = ("generate", "--prompt", "hi", "--seed", "7", "--max-tokens", "16", "--top-p", "0.9")
    a, b = run(*args), run(*args)
    assert a.returncode == 0 and a.stdout == b.stdout
    chat = run(*args, "--chat")
    assert "[2 prompt tokens" in a.stderr
    # "<|begin_of_sentence|>" is one token, then 20 bytes of "User: hi\nAssistant: "
    assert chat.returncode == 0 and "[21 prompt tokens" in chat.stderr


def test_bad_flags_name_the_flag():
    proc = run("generate", "--prompt", "x", "--top-p", "1.5")
    assert proc.returncode == 2 and "--top-p must be in (0, 1]" in proc.stderr
    proc = run("generate", "--prompt", "x", "--model", "/no/such/dir")
    assert proc.returncode == 2 and "--model '/no/such/dir': not a directory" in proc.stderr
    proc = run("generate", "--prompt", "x", "--max-tokens", "5000", "--max-model-len", "100")
    assert proc.returncode == 2 and "exceeds max_model_len (100)" in proc.stderr
    proc = run("generate", "--prompt", "x", "--backend", "cupy")
    assert proc.returncode == 2 and "--backend cupy" in proc.stderr


def test_demo_streams_a_chat_through_router_prefill_and_decode_and_stops_them():
    proc = run("demo", "--max-tokens", "12")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip()) > 0
    generated = int(proc.stderr.split(" generated;")[0].rsplit(" ", 1)[1])
    assert 1 <= generated <= 12 and "TTFT" in proc.stderr  # sampled: eos may come early
    moved = float(proc.stderr.split("KV moved prefill -> decode: ")[1].split(" KiB")[0])
    assert moved > 0  # the prompt's KV really crossed from the prefill to the decode node
    assert "stopped router and nodes (exit codes [0, 0, 0])" in proc.stderr
