"""Turns a list of sequence chunks into device buffers, runs the model, returns host logits.

The only engine module that builds arrays: schedulers hand it plain `SeqChunk`s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from pdserve.backends.base import Ops
from pdserve.engine.block_manager import SWAP_OUT
from pdserve.model.ernie45_moe import ErnieMoeForCausalLM
from pdserve.model.forward_batch import ForwardBatch


@dataclass
class SeqChunk:
    """The part of one sequence to compute in this step."""

    token_ids: Sequence[int]  # every known token of the sequence (prompt, then outputs)
    num_computed: int  # tokens whose KV is already in the cache
    num_new: int  # tokens to compute now, starting at num_computed
    block_table: Sequence[int]  # KV block ids covering at least num_computed + num_new tokens
    all_logits: bool = False  # logits for every new token, not only the last

    @property
    def context_len(self) -> int:
        return self.num_computed + self.num_new


class ModelRunner:
    """Owns the model and its KV pool [layers, 2, blocks, block_size, kv_heads, head_dim]."""

    def __init__(
        self,
        model: ErnieMoeForCausalLM,
        ops: Ops,
        num_blocks: int,
        block_size: int,
        num_host_blocks: int = 0,
        kv_cache: Any = None,
        workers: Any = None,
        graph_sizes: Sequence[int] = (),
        max_model_len: int | None = None,
    ) -> None:
        self.model = model
        self.workers = workers  # rank 0 of a tensor-parallel node: ranks 1.. (engine/workers.py)
        self.ops = ops
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = model.kv_cache_shape(num_blocks, block_size)
        # a pool allocated by the caller (shared memory on a decode node) or a fresh one
        self.kv_cache = ops.alloc_kv_cache(shape) if kv_cache is None else kv_cache
        assert tuple(self.kv_cache.shape) == shape, "KV pool of the wrong shape"
        # the --swap-space tier: host memory, same layout
        self.host_cache = np.zeros(model.kv_cache_shape(num_host_blocks, block_size), np.float32)
        # decode steps of up to max(graph_sizes) sequences as CUDA graphs (None: every step eager)
        self.graphs = None
        if graph_sizes:
            max_blocks = -(-(max_model_len or num_blocks * block_size) // block_size)
            self.graphs = ops.decode_graphs(model.forward, self.kv_cache, block_size,
                                            max_blocks, graph_sizes)  # fmt: skip

    def copy_blocks(self, copies: Sequence[tuple[int, int, int]]) -> None:
        """Run the block manager's swaps in order: (SWAP_OUT, block, slot) copies a device block
        to the host tier, (SWAP_IN, slot, block) back."""
        if copies and self.workers is not None:
            self.workers.copies(copies)
        for op, src, dst in copies:
            if op == SWAP_OUT:
                self.ops.copy_block(self.host_cache, dst, self.kv_cache, src)
            else:
                self.ops.copy_block(self.kv_cache, dst, self.host_cache, src)

    def build_batch(self, chunks: Sequence[SeqChunk]) -> ForwardBatch:
        """The pass's inputs as host (NumPy) arrays; `on_device` moves them."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        starts = [0]
        lens: list[int] = []
        logits_rows: list[int] = []
        width = max(-(-c.context_len // bs) for c in chunks)
        tables = np.zeros((len(chunks), width), dtype=np.int32)
        for s, c in enumerate(chunks):
            if c.num_new < 1 or c.context_len > len(c.token_ids):
                raise ValueError(
                    f"chunk {s}: {c.num_new} new tokens past {c.num_computed} "
                    f"do not fit its {len(c.token_ids)} tokens"
                )
            need = -(-c.context_len // bs)
            if len(c.block_table) < need:
                raise ValueError(
                    f"chunk {s}: {c.context_len} tokens need {need} blocks, "
                    f"block table has {len(c.block_table)}"
                )
            table = np.asarray(c.block_table[:need], dtype=np.int32)
            tables[s, :need] = table
            pos = np.arange(c.num_computed, c.context_len, dtype=np.int64)
            ids.extend(c.token_ids[c.num_computed : c.context_len])
            positions.append(pos)
            slots.append(table[pos // bs].astype(np.int64) * bs + pos % bs)
            first = starts[-1]
            starts.append(first + c.num_new)
            lens.append(c.context_len)
            rows = range(first, starts[-1]) if c.all_logits else [starts[-1] - 1]
            logits_rows.extend(rows)
        return ForwardBatch(
            input_ids=np.asarray(ids, dtype=np.int64),
            positions=np.concatenate(positions),
            slot_mapping=np.concatenate(slots),
            query_start_loc=np.asarray(starts, dtype=np.int32),
            seq_lens=np.asarray(lens, dtype=np.int32),
            block_tables=tables,
            logits_indices=np.asarray(logits_rows, dtype=np.int64),
            block_size=bs,
            query_start_loc_host=starts,
            seq_lens_host=lens,
        )

    def on_device(self, host: ForwardBatch) -> ForwardBatch:
        """The batch `build_batch` made on the host, with its arrays on the device."""
        to = self.ops.to_device
        return replace(
            host,
            **{f: to(getattr(host, f)) for f in ("input_ids", "positions", "slot_mapping",
                                                 "query_start_loc", "seq_lens", "block_tables",
                                                 "logits_indices")},
        )  # fmt: skip

    def execute(
        self,
        chunks: Sequence[SeqChunk],
        after_layer: Callable[[int], None] | None = None,
        kv_jobs: Sequence[Any] = (),
    ) -> np.ndarray | None:
        """Run one forward pass; logits [L, V] float32 on the host, in chunk order (None on
        tensor-parallel ranks but 0). `after_layer(i)` runs once layer i's KV of this batch is
        in the pool; the other ranks push `kv_jobs` (their shards of the same blocks)."""
        logits = self.execute_device(chunks, after_layer, kv_jobs)
        return None if logits is None else self.ops.to_host(logits).astype(np.float32, copy=False)

    def execute_device(
        self,
        chunks: Sequence[SeqChunk],
        after_layer: Callable[[int], None] | None = None,
        kv_jobs: Sequence[Any] = (),
    ) -> Any:
        """`execute`, leaving the logits [L, V] on the backend's device."""
        host = self.build_batch(chunks)
        if self.workers is not None:
            self.workers.step(host, kv_jobs)
        return self.execute_batch(host, after_layer)

    def execute_batch(
        self, host: ForwardBatch, after_layer: Callable[[int], None] | None = None
    ) -> Any:
        """Run the pass of a batch built on the host (by this runner or rank 0's): device logits,
        or None on tensor-parallel ranks but 0. Decode batches replay a CUDA graph when one fits."""
        if self.graphs is not None and after_layer is None:
            logits = self.graphs.run(host)
            if logits is not None:
                return logits
        batch = self.on_device(host)
        batch.after_layer = after_layer
        return self.model.forward(batch, self.kv_cache)
