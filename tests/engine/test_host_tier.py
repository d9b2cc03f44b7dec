"""The --swap-space tier: LRU slots, and the copies the block manager records for it."""

from __future__ import annotations

from pdserve.engine.block_manager import SWAP_IN, SWAP_OUT, BlockManager
from pdserve.engine.host_tier import HostTier
from pdserve.engine.request import Request
from pdserve.engine.sampling_params import SamplingParams


def test_lru_slots_are_recycled_oldest_first():
    tier = HostTier(2)
    a, b = tier.store(b"a"), tier.store(b"b")
    assert {a, b} == {0, 1} and tier.store(b"a") is None  # already there: touched, not stored
    c = tier.store(b"c")  # full: the least recently used entry (b) gives its slot
    assert c == b and b"b" not in tier and b"a" in tier
    slot = tier.take(b"a")
    tier.release(slot)
    tier.check_integrity()


def req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=4))


def test_evicted_prefix_is_swapped_out_then_back_in_with_its_hash():
    bm = BlockManager(num_blocks=4, block_size=2, num_host_blocks=8)
    a = req("a", [1, 2, 3, 4, 5])  # two full blocks, then one token
    assert bm.admit(a, bm.match_prefix(a), 5)
    a.num_computed_tokens = 5
    bm.cache_blocks(a)
    first_blocks = a.block_ids[:2]
    bm.release(a)
    b = req("b", [9, 9, 9, 9, 9, 9, 9])  # needs all 4 blocks: evicts a's cached ones
    assert bm.admit(b, bm.match_prefix(b), 7)
    outs = [c for c in bm.take_copies() if c[0] == SWAP_OUT]
    assert sorted(blk for _, blk, _ in outs) == sorted(first_blocks)
    bm.release(b)
    again = req("a2", [1, 2, 3, 4, 5])
    prefix = bm.match_prefix(again)
    hits = bm.match_host(again, len(prefix))
    assert prefix == [] and len(hits) == 2
    assert bm.admit(again, prefix, 1, host_hits=hits)
    assert again.num_computed_tokens == 4 and bm.swapped_in == 2
    ins = bm.take_copies()
    assert [op for op, _, _ in ins] == [SWAP_IN, SWAP_IN]
    assert [blk for _, _, blk in ins] == again.block_ids[:2]  # into the request's first blocks
    assert bm.match_prefix(req("a3", [1, 2, 3, 4, 5])) == again.block_ids[:2]  # cached again
    bm.release(again)
    bm.check_integrity([])
