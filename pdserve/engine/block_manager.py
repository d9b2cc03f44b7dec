"""Paged KV blocks with prefix caching: ref counts, chained block hashes, LRU eviction.

Plain Python, no arrays. A block is free when no request references it; a free block may still
hold a cached prefix (its hash stays registered) until it is taken for new tokens, least recently
freed first, blocks holding no cached prefix before any that do.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable

import numpy as np

from pdserve.engine.host_tier import HostTier
from pdserve.engine.request import Request

SWAP_OUT, SWAP_IN = 0, 1  # block copies: device block -> host slot, host slot -> device block


def chain_hash(parent: bytes, tokens: Iterable[int]) -> bytes:
    """Hash of a full block given its parent's hash: equal hashes mean equal token prefixes.

    Deterministic across processes (unlike `hash()`), so nodes and routers can compare them.
    """
    data = np.fromiter(tokens, dtype=np.int64).tobytes()
    return hashlib.blake2b(parent + data, digest_size=16).digest()


class BlockManager:
    """Owns the ids 0..num_blocks-1 of one KV pool; `block_size` tokens per block."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        num_host_blocks: int = 0,
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash of a full block -> the block holding it
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found
        self.host = HostTier(num_host_blocks) if num_host_blocks and enable_prefix_caching else None
        # (SWAP_OUT, block, slot) / (SWAP_IN, slot, block), to run in this order before the
        # next forward pass; the scheduler hands them over with its plan
        self.copies: list[tuple[int, int, int]] = []
        self.swapped_in = self.swapped_out = 0  # blocks, cumulative

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _update_hashes(self, req: Request) -> None:
        bs = self.block_size
        for i in range(len(req.block_hashes), req.num_tokens // bs):
            parent = req.block_hashes[-1] if req.block_hashes else b""
            req.block_hashes.append(chain_hash(parent, req.token_ids[i * bs : (i + 1) * bs]))

    def match_prefix(self, req: Request) -> list[int]:
        """Cached blocks holding the longest prefix of a new request (at least one token stays
        to compute, so the request gets logits). Takes no references."""
        if not self.enable_prefix_caching:
            return []
        self._update_hashes(req)
        limit = (req.num_tokens - 1) // self.block_size
        blocks = []
        for h in req.block_hashes[:limit]:
            block = self.cached.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def match_host(self, req: Request, start: int) -> list[bytes]:
        """Hashes of the blocks after the first `start` that the host tier holds, in order."""
        if self.host is None:
            return []
        limit = (req.num_tokens - 1) // self.block_size
        hits = []
        for h in req.block_hashes[start:limit]:
            if h not in self.host or h in self.cached:
                break
            hits.append(h)
        return hits

    def admit(
        self,
        req: Request,
        prefix: list[int],
        num_new_tokens: int,
        reserve: int = 0,
        host_hits: list[bytes] | None = None,
    ) -> bool:
        """Give a waiting request the cached `prefix` blocks, blocks swapped in for `host_hits`
        (see match_host) and blocks for `num_new_tokens` after them, if that leaves at least
        `reserve` blocks free. Sets its computed tokens."""
        assert not req.block_ids, "request already holds blocks"
        host_hits = host_hits or []
        num_cached = (len(prefix) + len(host_hits)) * self.block_size
        need = self.blocks_needed(num_cached + num_new_tokens) - len(prefix)
        revived = sum(1 for b in prefix if self.ref_counts[b] == 0)  # free now, taken back
        if need + revived > len(self.free) - reserve:
            return False
        for b in prefix:
            if self.ref_counts[b] == 0:
                del self.free[b]
            self.ref_counts[b] += 1
        # own the host slots first, so that evictions below cannot recycle them
        slots = [self.host.take(h) for h in host_hits] if self.host else []
        req.block_ids = list(prefix) + [self._take_free() for _ in range(need)]
        for i, (h, slot) in enumerate(zip(host_hits, slots), start=len(prefix)):
            block = req.block_ids[i]
            self.copies.append((SWAP_IN, slot, block))
            self.block_hash[block] = h
            self.cached[h] = block
            self.host.release(slot)
        self.swapped_in += len(host_hits)
        req.num_registered_blocks = len(prefix) + len(host_hits)
        req.num_computed_tokens = num_cached
        if req.status != req.status.PREEMPTED:  # a recompute is not a cache query
            req.num_cached_tokens = num_cached
            self.prefix_queries += req.num_prompt_tokens
            self.prefix_hits += num_cached
        return True

    def grow(self, req: Request, num_new_tokens: int) -> bool:
        """Make room for `num_new_tokens` more tokens past the computed ones; False if full."""
        need = self.blocks_needed(req.num_computed_tokens + num_new_tokens) - len(req.block_ids)
        if need > len(self.free):
            return False
        req.block_ids.extend(self._take_free() for _ in range(need))
        return True

    def cache_blocks(self, req: Request) -> None:
        """Register the request's newly computed full blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        self._update_hashes(req)
        full = min(req.num_computed_tokens // self.block_size, len(req.block_hashes))
        for i in range(req.num_registered_blocks, full):
            block, h = req.block_ids[i], req.block_hashes[i]
            if self.block_hash[block] is None and h not in self.cached:
                self.block_hash[block] = h
                self.cached[h] = block
        req.num_registered_blocks = max(req.num_registered_blocks, full)

    def release(self, req: Request) -> None:
        """Drop the request's references; its blocks stay cached until reused."""
        for b in reversed(req.block_ids):  # tail blocks first: they are the least shared
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self.free[b] = None
                if self.block_hash[b] is None:
                    self.free.move_to_end(b, last=False)  # reuse plain blocks first
        req.block_ids = []
        req.num_registered_blocks = 0

    def _take_free(self) -> int:
        block, _ = self.free.popitem(last=False)
        h = self.block_hash[block]
        if h is not None:  # evict the cached prefix it held, to the host tier if there is one
            del self.cached[h]
            self.block_hash[block] = None
            slot = self.host.store(h) if self.host else None
            if slot is not None:
                self.copies.append((SWAP_OUT, block, slot))
                self.swapped_out += 1
        self.ref_counts[block] = 1
        return block

    def take_copies(self) -> list[tuple[int, int, int]]:
        copies, self.copies = self.copies, []
        return copies

    def check_integrity(self, live: Iterable[Request] = ()) -> None:
        """Raise AssertionError unless ref counts match the live requests' block tables."""
        counts = [0] * self.num_blocks
        for req in live:
            for b in req.block_ids:
                counts[b] += 1
        assert counts == self.ref_counts, "ref counts differ from the live block tables"
        free = {b for b, n in enumerate(counts) if n == 0}
        assert free == set(self.free), "free list differs from the unreferenced blocks"
        for h, b in self.cached.items():
            assert self.block_hash[b] == h, f"block {b} lost its hash"
        assert sum(h is not None for h in self.block_hash) == len(self.cached)
        if self.host is not None:
            self.host.check_integrity()
