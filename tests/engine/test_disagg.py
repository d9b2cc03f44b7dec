"""Prefill and decode engines in one process, real ZeroMQ and shared memory between them:
the decode engine's greedy tokens equal a mixed engine's."""

from __future__ import annotations

import itertools
import socket
import time

import numpy as np
import pytest
import zmq

from pdserve.backends.numpy_ops import NumpyOps
from pdserve.engine.disagg import DecodeHandoff, PrefillHandoff
from pdserve.engine.engine_core import EngineCore
from pdserve.engine.rank_kv import RankedReceiver, RankedSender
from pdserve.engine.request import Request
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import SchedulerConfig
from pdserve.kvtransfer.receiver import KVReceiver
from pdserve.kvtransfer.sender import Destination, KVSender
from pdserve.kvtransfer.shm_pool import SharedKVPool
from pdserve.model.ernie45_moe import load_model
from pdserve.model.tiny import ensure_tiny_model

BS = 16
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
_ids = itertools.count()


def core(kv_cache=None, num_blocks: int = 64) -> EngineCore:
    ops = NumpyOps()
    model = load_model(ensure_tiny_model(), ops, progress=False)
    cfg = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=24, max_model_len=512)
    return EngineCore(model, ops, num_blocks, BS, cfg, True, 0, kv_cache)


def prompts() -> list[list[int]]:
    rng = np.random.default_rng(3)
    return [rng.integers(8, 264, n).tolist() for n in (5, 16, 17, 40, 70)]


def mixed(prompt: list[int]) -> list[int]:
    c = core()
    c.add_request(Request("m", prompt, GREEDY))
    out = []
    while c.has_unfinished():
        out += [o.token_id for o in c.step()]
    return out


class Pair:
    def __init__(self, ipc: bool) -> None:
        self.ctx = zmq.Context()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.pool = None
        self.prefill = core()
        shape = self.prefill.runner.kv_cache.shape
        if ipc:
            self.pool = SharedKVPool.create(f"pdst{next(_ids)}", shape)
        self.decode = core(self.pool.array if self.pool else None)
        self.receiver = KVReceiver(self.ctx, self.endpoint, self.decode.runner.kv_cache,
                                   shm_name=self.pool.name if self.pool else None)  # fmt: skip
        self.pusher = PrefillHandoff(self.prefill, RankedSender(KVSender(self.ctx)))
        self.prefill.pusher = self.pusher
        self.handoff = DecodeHandoff(self.decode, RankedReceiver(self.receiver))

    def close(self) -> None:
        self.receiver.close()
        self.pusher.sender.close()
        self.ctx.destroy(linger=0)
        if self.pool is not None:
            self.pool.close()
            self.pool.unlink()

    def generate(self, prompt: list[int], rid: str) -> tuple[list[int], int]:
        d = Request(rid, prompt, GREEDY)
        d.remote_prefill = True
        self.decode.add_request(d)
        self.decode.step()
        assert self.decode.remote_admitted.pop() is d
        tid = f"{rid}/t"
        wait = self.handoff.admitted(d, tid)
        n = self.decode.blocks.blocks_needed(len(prompt))
        dest = Destination(
            self.endpoint,
            d.block_ids[wait.first_block : n],
            self.pool.name if self.pool else None,
            tuple(self.decode.runner.kv_cache.shape),
            use_ipc=self.pool is not None,
        )
        p = Request(rid, prompt, SamplingParams(temperature=0, max_tokens=1))
        self.prefill.add_request(p)
        self.pusher.start(p, tid, [dest], wait.first_block)
        results = []
        deadline = time.monotonic() + 10
        while not results:
            assert time.monotonic() < deadline, "transfer never acknowledged"
            assert self.prefill.step() == []  # the first token is held back until the ack
            self.handoff.poll()
            results = self.pusher.poll()
        (r,) = results
        assert r.ok, r.error
        first = self.handoff.complete(rid, r.output.token_id, r.output.logprob)
        assert first is not None
        out = [first.token_id]
        while self.decode.has_unfinished():
            out += [o.token_id for o in self.decode.step()]
        return out, r.kv_bytes


@pytest.mark.parametrize("ipc", [False, True], ids=["zmq", "shm"])
def test_disaggregated_greedy_tokens_equal_mixed(ipc):
    pair = Pair(ipc)
    try:
        for i, p in enumerate(prompts()):
            got, sent = pair.generate(p, f"r{i}")
            assert got == mixed(p)
            assert sent > 0
        for c in (pair.prefill, pair.decode):
            c.blocks.check_integrity([])
            assert c.blocks.num_free_blocks == c.blocks.num_blocks
    finally:
        pair.close()


def test_decode_side_prefix_cache_moves_only_missing_blocks():
    pair = Pair(ipc=False)
    try:
        base = prompts()[-1]  # 70 tokens: 4 full blocks + 6
        _, full_bytes = pair.generate(base, "a")
        _, part_bytes = pair.generate(base[:64] + [9, 9, 9], "b")  # shares 4 blocks
        assert part_bytes < full_bytes / 4  # only the last, partial block travels
        assert pair.decode.blocks.prefix_hits >= 64
    finally:
        pair.close()


def test_fallback_recomputes_locally_when_the_transfer_fails():
    pair = Pair(ipc=False)
    try:
        p = prompts()[3]
        d = Request("f", p, GREEDY)
        d.remote_prefill = True
        pair.decode.add_request(d)
        pair.decode.step()
        pair.handoff.admitted(pair.decode.remote_admitted.pop(), "f/t")
        assert pair.handoff.complete("f", 0, 0.0) is None  # nothing landed
        assert pair.handoff.fallback("f")
        out = []
        while pair.decode.has_unfinished():
            out += [o.token_id for o in pair.decode.step()]
        assert out == mixed(p)
        assert pair.decode.blocks.num_free_blocks == pair.decode.blocks.num_blocks
    finally:
        pair.close()


def test_chunked_prefill_sends_every_block_of_every_layer_exactly_once():
    """The receiver counts (layer, block) pairs to decide a transfer is complete, so a block
    sent early (partial) and again later would let a lost final copy go unnoticed."""
    pair = Pair(ipc=False)
    sent: list[tuple[int, int]] = []
    sender = pair.pusher.sender.local
    real = sender.send_layer

    def recording(tid, layer, kv, src, offset=0):
        dest = sender._transfers[tid].dest.block_ids
        sent.extend((layer, b) for b in dest[offset : offset + len(src)])
        return real(tid, layer, kv, src, offset)

    sender.send_layer = recording
    try:
        p = prompts()[-1]  # 70 tokens in chunks of 24: blocks 1 and 4 are partial mid-prefill
        got, _ = pair.generate(p, "once")
        assert got == mixed(p)
        assert len(sent) == len(set(sent)) == 4 * 5  # 4 layers x 5 blocks, no repeats
    finally:
        pair.close()
