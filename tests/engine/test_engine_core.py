"""The engine loop on the tiny model: batching, prefix caching, chunking and preemption never
change greedy output, and every block comes back."""

from __future__ import annotations

import numpy as np
import pytest

from pdserve.engine.llm import LLM
from pdserve.engine.request import Request
from pdserve.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def make_llm(**kw) -> LLM:
    kw.setdefault("block_size", 16)
    kw.setdefault("num_blocks", 256)
    return LLM("tiny", backend="numpy", progress=False, **kw)


def prompts(n: int, seed: int = 0, lo: int = 1, hi: int = 90) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(8, 264, int(rng.integers(lo, hi))).tolist() for _ in range(n)]


def assert_no_leak(llm: LLM) -> None:
    e = llm.engine
    assert not e.has_unfinished()
    e.blocks.check_integrity([])
    assert e.blocks.num_free_blocks == e.blocks.num_blocks


@pytest.fixture(scope="module")
def alone() -> dict[tuple[int, ...], list[int]]:
    """Greedy output of each prompt run by itself, prefix caching off: the reference."""
    llm = make_llm(enable_prefix_caching=False)
    return {tuple(p): llm.generate_all([p], [GREEDY])[0] for p in prompts(40)}


def test_32_concurrent_requests_match_each_alone(alone):
    llm = make_llm(enable_prefix_caching=False)
    batch = prompts(40)[:32]
    got = llm.generate_all(batch, [GREEDY] * 32)
    assert got == [alone[tuple(p)] for p in batch]
    assert_no_leak(llm)


def test_prefix_cache_hits_and_gives_identical_output(alone):
    llm = make_llm()
    base = prompts(40)
    long = [p for p in base if len(p) >= 40]
    llm.generate_all(long[:1], [GREEDY])
    # same 32-token prefix as the first, different continuations
    shared = [long[0][:32] + p[32:] for p in long[1:6]]
    ref = make_llm(enable_prefix_caching=False).generate_all(shared, [GREEDY] * len(shared))
    hits = llm.engine.blocks.prefix_hits
    assert llm.generate_all(shared, [GREEDY] * len(shared)) == ref
    assert llm.engine.blocks.prefix_hits - hits >= 32 * len(shared)
    assert_no_leak(llm)


@pytest.mark.parametrize("budget", [7, 16, 64])
def test_chunked_prefill_under_small_budgets_is_identical(alone, budget):
    llm = make_llm(max_num_batched_tokens=budget)
    batch = prompts(40)[:10]
    assert llm.generate_all(batch, [GREEDY] * 10) == [alone[tuple(p)] for p in batch]
    assert_no_leak(llm)


def test_chunked_prefill_off_is_identical(alone):
    llm = make_llm(enable_chunked_prefill=False, max_num_batched_tokens=4096, max_model_len=4096)
    batch = prompts(40)[:10]
    assert llm.generate_all(batch, [GREEDY] * 10) == [alone[tuple(p)] for p in batch]


@pytest.mark.parametrize("ratio", [0.75, 1.0])
def test_pool_small_enough_to_preempt_still_gives_identical_output(alone, ratio):
    llm = make_llm(num_blocks=8, max_num_batched_tokens=64, kv_cache_ratio=ratio)
    batch = prompts(40)[:12]
    assert llm.generate_all(batch, [GREEDY] * 12) == [alone[tuple(p)] for p in batch]
    assert llm.engine.num_preemptions > 0
    assert_no_leak(llm)


def test_seeded_sampling_is_batch_independent():
    llm = make_llm()
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=123, max_tokens=16, ignore_eos=True)
    p = prompts(3, seed=5)
    alone_out = llm.generate_all([p[0]], [params])[0]
    other = SamplingParams(temperature=1.0, max_tokens=16)
    assert llm.generate_all([p[1], p[0], p[2]], [other, params, other])[1] == alone_out


def test_abort_frees_blocks_and_other_requests_continue(alone):
    llm = make_llm()
    batch = prompts(40)[:4]
    for i, p in enumerate(batch):
        llm.engine.add_request(Request(f"r{i}", p, GREEDY))
    outs: dict[str, list[int]] = {f"r{i}": [] for i in range(4)}
    for step in range(5):
        for o in llm.engine.step():
            outs[o.request_id].append(o.token_id)
        if step == 2:
            assert llm.engine.abort("r1") and not llm.engine.abort("r1")
    while llm.engine.has_unfinished():
        for o in llm.engine.step():
            outs[o.request_id].append(o.token_id)
    for i in (0, 2, 3):
        assert outs[f"r{i}"] == alone[tuple(batch[i])]
    assert len(outs["r1"]) < GREEDY.max_tokens
    assert_no_leak(llm)


def test_stop_token_and_max_model_len_end_requests():
    llm = make_llm(max_model_len=40)
    p = prompts(1, seed=9, lo=20, hi=21)[0]
    first = llm.generate_all([p], [GREEDY])[0]
    stop = SamplingParams(temperature=0, max_tokens=12, stop_token_ids=(first[3],))
    got = list(llm.generate([p], [stop]))
    assert [o.token_id for s in got for _, o in s] == first[:4]
    assert got[-1][0][1].finish_reason == "stop"
    with pytest.raises(ValueError, match="exceeds max_model_len"):
        llm.generate_all([p], [SamplingParams(max_tokens=21)])


def test_swap_space_tier_brings_evicted_prefixes_back(alone):
    """A prefix evicted from a small device pool is restored from the host tier, not recomputed."""
    llm = make_llm(num_blocks=12, num_host_blocks=128)
    base = prompts(40)
    target = max(base, key=len)  # 5+ full blocks
    assert llm.generate_all([target], [GREEDY])[0] == alone[tuple(target)]
    for p in prompts(30, seed=7):  # enough other prompts to evict every block of target's
        llm.generate_all([p], [GREEDY])
    blocks = llm.engine.blocks
    assert blocks.swapped_out >= len(target) // 16
    hits, swapped_in = blocks.prefix_hits, blocks.swapped_in
    assert llm.generate_all([target], [GREEDY])[0] == alone[tuple(target)]
    assert blocks.swapped_in - swapped_in >= len(target) // 16 - 1
    assert blocks.prefix_hits - hits >= 16 * (len(target) // 16 - 1)
    assert_no_leak(llm)


def test_without_swap_space_the_evicted_prefix_is_recomputed(alone):
    llm = make_llm(num_blocks=12)
    base = prompts(40)
    target = max(base, key=len)
    llm.generate_all([target], [GREEDY])
    for p in prompts(30, seed=7):
        llm.generate_all([p], [GREEDY])
    hits = llm.engine.blocks.prefix_hits
    assert llm.generate_all([target], [GREEDY])[0] == alone[tuple(target)]
    assert llm.engine.blocks.prefix_hits == hits
