from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

from pdserve.engine.block_manager import BlockManager, chain_hash
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.sampling_params import SamplingParams

BS = 4  # tokens per block in every test here


def make_request(tokens, request_id: str = "r") -> Request:
    return Request(request_id, list(tokens), SamplingParams(max_tokens=16), eos_token_ids=(2,))


def make_blocks(num_blocks: int = 8, caching: bool = True) -> BlockManager:
    return BlockManager(num_blocks, BS, enable_prefix_caching=caching)


def prefill(blocks: BlockManager, req: Request, reserve: int = 0) -> bool:
    """Admit `req` with its cached prefix, compute its whole prompt and cache its full blocks."""
    prefix = blocks.match_prefix(req)
    if not blocks.admit(req, prefix, req.num_tokens - len(prefix) * BS, reserve):
        return False
    req.num_computed_tokens = req.num_tokens
    blocks.cache_blocks(req)
    return True


def take(blocks: BlockManager, num: int) -> list[int]:
    """Take `num` blocks for a prompt unlike any other (no prefix), as a new request would."""
    filler = make_request(range(10_000, 10_000 + num * BS), "filler")
    assert blocks.admit(filler, [], num * BS)
    return filler.block_ids


def hashes_of(tokens) -> list[bytes]:
    req = make_request(tokens)
    make_blocks().match_prefix(req)  # fills in the request's chained block hashes
    return req.block_hashes


def test_same_prefix_gives_same_hashes_and_a_different_block_changes_all_later_ones():
    base = list(range(100, 116))  # 4 full blocks
    same = hashes_of(base + [1, 2])
    assert same == hashes_of(base)  # a partial tail block has no hash
    assert len(same) == 4
    tail_changed = hashes_of(base[:12] + [9, 9, 9, 9])
    assert tail_changed[:3] == same[:3] and tail_changed[3] != same[3]
    head_changed = hashes_of([7] + base[1:])  # only the very first token differs
    assert all(a != b for a, b in zip(head_changed, same))
    assert same[1] == chain_hash(chain_hash(b"", base[:4]), base[4:8])


def test_chain_hash_is_deterministic_across_processes():
    code = (
        "from pdserve.engine.block_manager import chain_hash;"
        "print(chain_hash(chain_hash(b'', [1, 2, 3, 4]), [5, 6, 7, 8]).hex())"
    )
    digests = set()
    for seed in ("1", "2"):  # str/bytes hash() would differ between these processes
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
        )
        digests.add(out.stdout.strip())
    assert digests == {chain_hash(chain_hash(b"", [1, 2, 3, 4]), [5, 6, 7, 8]).hex()}


def test_match_returns_the_cached_blocks_of_the_longest_full_block_prefix():
    blocks = make_blocks(num_blocks=16)
    first = make_request(range(100, 113), "first")  # 3 full blocks + 1 token
    assert prefill(blocks, first)
    assert blocks.match_prefix(make_request(range(100, 113))) == first.block_ids[:3]
    longer = make_request(list(range(100, 113)) + [5] * 9)
    assert blocks.match_prefix(longer) == first.block_ids[:3]
    diverging = make_request(list(range(100, 108)) + [0] * 8)  # differs in the third block
    assert blocks.match_prefix(diverging) == first.block_ids[:2]
    assert blocks.match_prefix(make_request([1] + list(range(101, 113)))) == []


@pytest.mark.parametrize("k", [1, 2, 3])
def test_a_prompt_of_exactly_k_full_blocks_matches_k_minus_1(k):
    blocks = make_blocks()
    assert prefill(blocks, make_request(range(100, 100 + k * BS), "first"))
    again = make_request(range(100, 100 + k * BS))
    prefix = blocks.match_prefix(again)
    assert len(prefix) == k - 1  # the last token must be computed to get logits
    assert blocks.admit(again, prefix, again.num_tokens - len(prefix) * BS)
    assert again.num_computed_tokens == (k - 1) * BS < again.num_tokens


def test_requests_sharing_a_prefix_share_its_blocks():
    blocks = make_blocks()
    a = make_request(list(range(100, 108)) + [1, 2], "a")
    b = make_request(list(range(100, 108)) + [3], "b")
    assert prefill(blocks, a)
    prefix = blocks.match_prefix(b)
    assert blocks.admit(b, prefix, 1)
    assert b.block_ids[:2] == a.block_ids[:2]
    assert b.block_ids[2] != a.block_ids[2]  # each keeps its own partial tail
    assert b.num_computed_tokens == b.num_cached_tokens == 8
    assert [blocks.ref_counts[x] for x in b.block_ids] == [2, 2, 1]
    assert blocks.num_free_blocks == 8 - 4
    blocks.check_integrity([a, b])
    blocks.release(a)
    assert [blocks.ref_counts[x] for x in b.block_ids] == [1, 1, 1]
    blocks.release(b)
    assert blocks.num_free_blocks == 8
    blocks.check_integrity([])


def test_released_cached_blocks_are_hit_until_evicted():
    blocks = make_blocks(num_blocks=4)
    a = make_request(range(100, 109), "a")
    assert prefill(blocks, a)
    cached = a.block_ids[:2]
    blocks.release(a)
    assert blocks.num_free_blocks == 4  # cached but free
    b = make_request(range(100, 109), "b")
    assert prefill(blocks, b)
    assert b.block_ids[:2] == cached and b.num_cached_tokens == 8
    blocks.release(b)
    take(blocks, 4)  # a pool full of other tokens evicts the prefix
    assert blocks.match_prefix(make_request(range(100, 109))) == []


def test_eviction_takes_plain_blocks_first_then_least_recently_freed():
    blocks = make_blocks(num_blocks=6)
    a = make_request(range(100, 109), "a")  # 2 cached blocks + 1 plain
    b = make_request(range(200, 205), "b")  # 1 cached block + 1 plain
    assert prefill(blocks, a) and prefill(blocks, b)
    blocks.release(a)  # freed before b: evicted before b
    blocks.release(b)

    def matched() -> tuple[int, int]:
        return (
            len(blocks.match_prefix(make_request(range(100, 109)))),
            len(blocks.match_prefix(make_request(range(200, 205)))),
        )

    assert matched() == (2, 1)
    take(blocks, 3)  # the two plain tails and the never-used block
    assert matched() == (2, 1)
    take(blocks, 1)  # a's tail block goes first: its head is more likely shared
    assert matched() == (1, 1)
    take(blocks, 1)
    assert matched() == (0, 1)
    take(blocks, 1)
    assert matched() == (0, 0)


def test_a_prefix_hit_refreshes_the_cached_blocks_recency():
    blocks = make_blocks(num_blocks=4)
    a, b = make_request(range(100, 104), "a"), make_request(range(200, 204), "b")
    assert prefill(blocks, a) and prefill(blocks, b)
    blocks.release(a)
    blocks.release(b)
    a2 = make_request(range(100, 105), "a2")  # reuses a's block, freed again after b's
    assert prefill(blocks, a2) and a2.num_cached_tokens == 4
    blocks.release(a2)
    take(blocks, 3)  # 1 plain block, then b's (least recently freed)
    assert len(blocks.match_prefix(make_request(range(100, 105)))) == 1
    assert blocks.match_prefix(make_request(range(200, 205))) == []


def test_admit_respects_reserve_and_counts_revived_cached_blocks():
    blocks = make_blocks(num_blocks=8)
    req = make_request(range(100, 121))  # 6 blocks
    assert not blocks.admit(req, [], 21, reserve=3)
    assert req.block_ids == [] and blocks.num_free_blocks == 8 and blocks.prefix_queries == 0
    assert blocks.admit(req, [], 21, reserve=2)
    assert blocks.num_free_blocks == 2
    blocks.release(req)

    blocks = make_blocks(num_blocks=4)
    a = make_request(range(100, 109), "a")
    assert prefill(blocks, a)
    blocks.release(a)  # its 2 cached blocks are free: taking them back uses free blocks too
    again = make_request(range(100, 109), "again")
    prefix = blocks.match_prefix(again)
    assert len(prefix) == 2
    assert not blocks.admit(again, prefix, 1, reserve=2)  # 2 revived + 1 new leaves 1
    assert again.block_ids == [] and blocks.num_free_blocks == 4
    assert blocks.admit(again, prefix, 1, reserve=1)
    assert blocks.num_free_blocks == 1


def test_grow_returns_false_when_full_and_takes_nothing():
    blocks = make_blocks(num_blocks=3)
    req = make_request(range(100, 108))
    assert prefill(blocks, req)  # 2 blocks, both full
    assert not blocks.grow(req, 5)  # needs 2 more blocks, 1 is free
    assert len(req.block_ids) == 2 and blocks.num_free_blocks == 1
    assert blocks.grow(req, 4)
    assert len(req.block_ids) == 3 and blocks.num_free_blocks == 0
    req.num_computed_tokens += 1
    assert blocks.grow(req, 3)  # still inside the last block: needs nothing
    assert not blocks.grow(req, 4)
    assert len(req.block_ids) == 3
    blocks.check_integrity([req])


def test_prefix_counters_count_prompt_tokens_but_not_recomputes():
    blocks = make_blocks(num_blocks=16)
    assert prefill(blocks, make_request(range(100, 113), "a"))
    assert (blocks.prefix_queries, blocks.prefix_hits) == (13, 0)
    assert prefill(blocks, make_request(range(100, 113), "b"))
    assert (blocks.prefix_queries, blocks.prefix_hits) == (26, 12)
    recompute = make_request(range(100, 113), "c")
    recompute.status = RequestStatus.PREEMPTED
    assert prefill(blocks, recompute)
    assert (blocks.prefix_queries, blocks.prefix_hits) == (26, 12)
    assert not prefill(blocks, make_request(range(300, 364), "too-big"))
    assert (blocks.prefix_queries, blocks.prefix_hits) == (26, 12)


def test_disabled_prefix_caching_never_matches():
    blocks = make_blocks(caching=False)
    a = make_request(range(100, 113), "a")
    assert prefill(blocks, a)
    blocks.release(a)
    b = make_request(range(100, 113), "b")
    assert blocks.match_prefix(b) == []
    assert blocks.admit(b, [], 13)
    assert b.num_cached_tokens == b.num_computed_tokens == 0
    assert blocks.prefix_hits == 0 and blocks.prefix_queries == 26


def test_random_admit_grow_cache_release_keeps_integrity_and_contents():
    rng = random.Random(1234)
    blocks = make_blocks(num_blocks=24)
    heads = [[rng.randrange(3, 50) for _ in range(rng.randrange(1, 12))] for _ in range(4)]
    kv: dict[tuple[int, int], int] = {}  # (block, slot) -> token whose KV sits there
    live: list[Request] = []

    def compute(req: Request, n: int) -> None:
        for pos in range(req.num_computed_tokens, req.num_computed_tokens + n):
            kv[req.block_ids[pos // BS], pos % BS] = req.token_ids[pos]
        req.num_computed_tokens += n
        blocks.cache_blocks(req)
        if req.num_computed_tokens == req.num_tokens:
            req.append_token(rng.randrange(3, 50))

    for i in range(400):
        op = rng.random()
        if op < 0.3:
            tail = [rng.randrange(3, 50) for _ in range(rng.randrange(1, 10))]
            req = make_request(rng.choice(heads) + tail, f"r{i}")
            prefix = blocks.match_prefix(req)
            n = min(req.num_tokens - len(prefix) * BS, rng.randrange(1, 16))
            if blocks.admit(req, prefix, n, reserve=rng.randrange(3)):
                live.append(req)
                compute(req, n)
        elif op < 0.8 and live:
            req = rng.choice(live)
            n = min(req.num_tokens - req.num_computed_tokens, rng.randrange(1, 8))
            if blocks.grow(req, n):
                compute(req, n)
        elif live:
            blocks.release(live.pop(rng.randrange(len(live))))
        blocks.check_integrity(live)
        for req in live:  # every request reads its own tokens back, shared blocks included
            for pos in range(req.num_computed_tokens):
                assert kv[req.block_ids[pos // BS], pos % BS] == req.token_ids[pos]
    assert blocks.prefix_hits > 0
    for req in live:
        blocks.release(req)
    blocks.check_integrity([])
    assert blocks.num_free_blocks == blocks.num_blocks


def test_check_integrity_detects_a_corrupted_ref_count():
    blocks = make_blocks()
    req = make_request(range(100, 110))
    assert prefill(blocks, req)
    blocks.check_integrity([req])
    blocks.ref_counts[req.block_ids[0]] += 1
    with pytest.raises(AssertionError, match="ref counts"):
        blocks.check_integrity([req])
    with pytest.raises(AssertionError):
        make_blocks().check_integrity([req])  # a block table the pool never handed out
