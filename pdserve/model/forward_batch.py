"""The explicit context of one forward pass: which tokens, where they sit, where their KV goes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class ForwardBatch:
    """A flat batch of T new tokens from S sequences (prefill chunks and decodes mixed).

    Sequence s owns rows query_start_loc[s]:query_start_loc[s+1] of every [T, ...] array; its
    new tokens are the last ones of its context of seq_lens[s] tokens, so token j of the chunk sits
    at position seq_lens[s] - q_len + j and attends to positions 0..that. Arrays live on the
    backend's device; the model never reads them on the host.
    """

    input_ids: Any  # [T] int64
    positions: Any  # [T] int64, absolute positions in their sequences
    slot_mapping: Any  # [T] int64, block_id * block_size + offset of each token's KV slot
    query_start_loc: Any  # [S + 1] int32, prefix sums of new tokens per sequence
    seq_lens: Any  # [S] int32, tokens in context after this pass (cached + new)
    block_tables: Any  # [S, max_blocks] int32, KV block ids per sequence (padding unused)
    logits_indices: Any  # [L] int64, rows of T whose logits are wanted
    block_size: int  # tokens per KV block
    # Host copies of query_start_loc and seq_lens, for backends that loop over sequences on the CPU.
    query_start_loc_host: list[int] | None = None
    seq_lens_host: list[int] | None = None
    # Called with the layer index once that layer's KV for this batch is in the pool: a prefill
    # node pushes it to the decode node while the next layers compute.
    after_layer: Callable[[int], None] | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])
