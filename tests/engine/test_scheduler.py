from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator

import pytest

from pdserve.engine.block_manager import BlockManager
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import Scheduler, SchedulerConfig, StepPlan

FAKE_TOKEN = 7  # what the fake model always samples: not the eos id 2


def make_request(num_prompt: int, request_id: str, max_tokens: int = 4, first: int = 0) -> Request:
    """A prompt of distinct tokens; requests with different `first` share no prefix."""
    tokens = [100 + first * 1000 + i for i in range(num_prompt)]
    return Request(request_id, tokens, SamplingParams(max_tokens=max_tokens), eos_token_ids=(2,))


def make_scheduler(num_blocks: int = 64, block_size: int = 4, **config) -> Scheduler:
    return Scheduler(SchedulerConfig(**config), BlockManager(num_blocks, block_size))


def add_all(sched: Scheduler, *specs: tuple[int, int]) -> list[Request]:
    """Add one request per (prompt length, max_tokens), each with its own tokens."""
    reqs = [make_request(n, f"r{i}", m, first=i) for i, (n, m) in enumerate(specs)]
    for req in reqs:
        sched.add(req)
    return reqs


def update(sched: Scheduler, plan: StepPlan) -> None:
    """The engine's update after a step, with a fake model output."""
    for req, n in zip(plan.requests, plan.num_new_tokens):
        req.num_computed_tokens += n
        sched.blocks.cache_blocks(req)
        if req.num_computed_tokens == req.num_tokens:
            req.append_token(FAKE_TOKEN)
            status = req.check_stop(sched.config.max_model_len)
            if status is not None:
                sched.finish(req, status)


def steps(
    sched: Scheduler, max_steps: int = 2000, before_step: Callable[[int], None] | None = None
) -> Iterator[StepPlan]:
    """Schedule and update until every request finishes; yields each plan before its update.
    `before_step(i)` runs between steps, where the engine adds and aborts requests."""
    for i in range(max_steps):
        if before_step is not None:
            before_step(i)
        if not sched.num_unfinished:
            return
        plan = sched.schedule()
        assert plan or plan.preempted, "no progress: the scheduler stalled with work left"
        sched.blocks.check_integrity(sched.running)
        yield plan
        update(sched, plan)
    raise AssertionError(f"requests still unfinished after {max_steps} steps")


def assert_no_leaks(sched: Scheduler, reqs: list[Request]) -> None:
    assert all(r.is_finished and r.block_ids == [] for r in reqs)
    sched.blocks.check_integrity([])
    assert sched.blocks.num_free_blocks == sched.blocks.num_blocks


@pytest.mark.parametrize(
    ("config", "flags"),
    [
        ({"max_num_seqs": 0}, ["--max-num-seqs"]),
        ({"max_num_batched_tokens": 0}, ["--max-num-batched-tokens"]),
        ({"kv_cache_ratio": 0.0}, ["--kv-cache-ratio"]),
        ({"kv_cache_ratio": 1.5}, ["--kv-cache-ratio"]),
        (
            {"enable_chunked_prefill": False, "max_num_batched_tokens": 64, "max_model_len": 128},
            ["--max-num-batched-tokens", "--max-model-len"],
        ),
    ],
)
def test_config_errors_name_the_flag(config, flags):
    with pytest.raises(ValueError) as err:
        SchedulerConfig(**config)
    for flag in flags:
        assert flag in str(err.value)


def test_add_rejects_prompt_plus_max_tokens_over_max_model_len():
    sched = make_scheduler(max_model_len=32)
    with pytest.raises(ValueError, match=re.escape("max_model_len (32)")):
        sched.add(make_request(30, "long", max_tokens=3))
    assert sched.num_unfinished == 0
    sched.add(make_request(29, "fits", max_tokens=3))
    assert sched.num_unfinished == 1


def test_token_budget_is_respected_every_step_and_all_finish():
    rng = random.Random(0)
    sched = make_scheduler(num_blocks=128, max_num_batched_tokens=16)
    reqs = add_all(sched, *[(rng.randrange(1, 40), rng.randrange(1, 12)) for _ in range(20)])
    for plan in steps(sched):
        assert all(n >= 1 for n in plan.num_new_tokens)
        assert plan.total_tokens <= 16
        assert len({id(r) for r in plan.requests}) == len(plan.requests)
    assert [r.num_output_tokens for r in reqs] == [r.params.max_tokens for r in reqs]
    assert_no_leaks(sched, reqs)


def test_chunked_prefill_splits_a_long_prompt_and_mixes_in_decodes():
    sched = make_scheduler(max_num_batched_tokens=8)
    (short,) = add_all(sched, (3, 20))
    update(sched, sched.schedule())  # short's prefill: it is decoding from now on
    long = make_request(30, "long", first=9)
    sched.add(long)
    chunks = []
    while long.num_output_tokens == 0:
        plan = sched.schedule()
        planned = dict(zip(map(id, plan.requests), plan.num_new_tokens))
        assert planned[id(short)] == 1  # the decode rides along with every chunk
        chunks.append(planned[id(long)])
        assert plan.total_tokens <= 8
        update(sched, plan)
    assert chunks == [7, 7, 7, 7, 2]


@pytest.mark.parametrize("chunked", [False, True])
def test_without_chunked_prefill_a_prompt_is_never_split(chunked):
    sched = make_scheduler(
        max_num_batched_tokens=32, max_model_len=32, enable_chunked_prefill=chunked
    )
    reqs = add_all(sched, *[(3, 8)] * 6, (28, 4), (28, 4))
    split = False
    for plan in steps(sched):
        for req, n in zip(plan.requests, plan.num_new_tokens):
            split |= req.num_computed_tokens + n < req.num_prompt_tokens
    assert split == chunked  # the same load does split prompts when chunking is on
    assert_no_leaks(sched, reqs)


def test_max_num_seqs_caps_running_requests():
    sched = make_scheduler(max_num_seqs=3)
    reqs = add_all(sched, *[(5, 6)] * 8)
    peak = 0
    for plan in steps(sched):
        assert len(sched.running) <= 3 and len(plan.requests) <= 3
        peak = max(peak, len(sched.running))
    assert peak == 3
    assert_no_leaks(sched, reqs)


def test_preemption_takes_the_newest_first_and_requeues_it_at_the_front():
    # 6 blocks of 4 tokens; each request holds 2 after its prefill and needs 4 to finish
    sched = make_scheduler(num_blocks=6, kv_cache_ratio=1.0)
    a, b, c = add_all(sched, (7, 10), (7, 10), (7, 10))
    late = make_request(3, "late", max_tokens=2, first=8)
    for _ in range(2):  # prefill and one decode: 9 tokens each, the pool is full
        update(sched, sched.schedule())
    sched.add(late)
    assert sched.blocks.num_free_blocks == 0

    plan = sched.schedule()  # a needs a third block: c, the newest, makes room
    assert plan.preempted == [c]
    assert plan.requests == [a, b]
    assert c.status == RequestStatus.PREEMPTED and c.block_ids == []
    assert c.num_computed_tokens == 0 and c.num_output_tokens == 2  # its outputs are kept
    assert list(sched.waiting) == [c, late] and sched.running == [a, b]
    sched.blocks.check_integrity(sched.running)
    update(sched, plan)

    preempted, readmitted, before = [c], [], set(plan.requests)
    for plan in steps(sched):  # the budget is large: every running request is in every plan
        preempted += plan.preempted
        for req, n in zip(plan.requests, plan.num_new_tokens):
            if req not in before:  # an admission: all its tokens are recomputed or cached
                readmitted.append(req)
                assert req.num_computed_tokens + n == req.num_tokens
                assert req.num_cached_tokens <= req.num_prompt_tokens  # first admission only
        before = set(plan.requests)
        if b in plan.preempted:
            assert sched.waiting[0] is b and sched.waiting[1] is c
    assert preempted == [c, b]
    assert readmitted[:3] == [b, c, late]  # back in their original order, ahead of late
    assert all(r.num_output_tokens == r.params.max_tokens for r in (a, b, c, late))
    assert_no_leaks(sched, [a, b, c, late])


def test_random_load_on_a_tiny_pool_preempts_and_still_finishes_everything():
    rng = random.Random(7)
    sched = make_scheduler(num_blocks=16, max_num_batched_tokens=24)
    reqs = [
        make_request(rng.randrange(1, 20), f"r{i}", rng.randrange(1, 30), first=i % 5)
        for i in range(30)
    ]  # `first` repeats: many requests share their prompts' prefixes
    for req in reqs[:10]:
        sched.add(req)

    def arrivals_and_aborts(i: int) -> None:
        if i < 20:
            sched.add(reqs[10 + i])
        if i == 25:  # an abort of a running and of a waiting request
            sched.finish(sched.running[0], RequestStatus.FINISHED_ABORTED)
            sched.finish(sched.waiting[-1], RequestStatus.FINISHED_ABORTED)

    num_preempted = sum(len(plan.preempted) for plan in steps(sched, 2000, arrivals_and_aborts))
    assert num_preempted > 0
    assert sched.blocks.prefix_hits > 0
    done = [r for r in reqs if r.status != RequestStatus.FINISHED_ABORTED]
    assert len(done) == 28
    assert all(r.num_output_tokens == r.params.max_tokens for r in done)
    assert_no_leaks(sched, reqs)


@pytest.mark.parametrize(("num_blocks", "ratio"), [(10, 0.5), (8, 0.75), (10, 0.8), (100, 0.9)])
def test_new_prefills_leave_the_reserved_share_free_while_something_runs(num_blocks, ratio):
    sched = make_scheduler(num_blocks=num_blocks, kv_cache_ratio=ratio)
    add_all(sched, (3, 20))
    update(sched, sched.schedule())  # one request running, in one block
    for i in range(num_blocks):
        sched.add(make_request(4, f"p{i}", first=i + 1))  # one block each
    sched.schedule()
    reserved = num_blocks - round(num_blocks * ratio)  # e.g. 2 of 10 blocks at 0.8
    assert sched.blocks.num_free_blocks == reserved, (
        f"kv_cache_ratio={ratio} of {num_blocks} blocks should keep {reserved} blocks from "
        f"new prefills, kept {sched.blocks.num_free_blocks}"
    )
    assert len(sched.running) == num_blocks - reserved  # up to the ratio, not short of it


def test_with_nothing_running_a_prefill_may_use_the_reserve():
    sched = make_scheduler(num_blocks=10, kv_cache_ratio=0.5)
    (big,) = add_all(sched, (36, 4))  # 9 of 10 blocks
    plan = sched.schedule()
    assert plan.requests == [big] and sched.blocks.num_free_blocks == 1


def test_a_request_whose_output_cannot_fit_the_pool_is_rejected_or_finishes():
    # 2 blocks of 4 tokens: the prompt fits, but prompt + max_tokens needs 3 blocks
    sched = make_scheduler(num_blocks=2)
    req = make_request(7, "r", max_tokens=5)
    try:
        sched.add(req)
    except ValueError:
        return
    list(steps(sched, max_steps=50))  # today: preempts itself, then waits forever
    assert req.num_output_tokens == 5
