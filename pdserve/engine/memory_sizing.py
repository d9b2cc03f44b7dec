"""KV pool sizing on a GPU from its memory: FastDeploy's and vLLM's --gpu-memory-utilization.

The node may use `total x utilization` bytes of the GPU. After the weights are loaded, one
profiling forward pass at the largest step the scheduler can make (--max-num-batched-tokens
tokens over --max-num-seqs sequences) against a tiny temporary KV pool measures the activation
peak (CuPy's memory pool only grows, so its size after the pass is its high-water mark) and
what the pass took outside the pool (cuBLAS workspaces, loaded kernels). What is left after
weights, activations, that, and a margin for the decode CUDA graphs (captured only after the
pool exists, so they cannot be measured first) becomes KV blocks. `plan_kv_blocks` is that
arithmetic, on plain numbers; the NumPy backend keeps engine_core's sizing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from pdserve.backends.base import Ops
from pdserve.engine_config import EngineConfig
from pdserve.model.forward_batch import ForwardBatch

logger = logging.getLogger("pdserve.engine")

GiB = float(1 << 30)
# the decode graphs' private memory (per captured batch size: its activations); an estimate
# for up to 128 sequences of ERNIE-4.5-21B-A3B with room to spare
CUDA_GRAPH_MARGIN_BYTES = 1 << 30


@dataclass(frozen=True)
class MemoryPlan:
    """Where a GPU's memory goes (bytes), and the KV blocks that come out of it."""

    total_bytes: int
    utilization: float
    weights_bytes: int
    activation_bytes: int
    other_bytes: int  # outside CuPy's pool: cuBLAS workspaces, kernels, graphs' margin
    block_bytes: int  # one block over all layers, K and V, this rank's KV heads
    block_size: int  # tokens per block
    num_blocks: int
    max_model_len: int  # tokens

    @property
    def kv_bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    @property
    def max_concurrent_seqs(self) -> int:
        """Sequences of --max-model-len tokens the pool holds at once."""
        return self.num_blocks // -(-self.max_model_len // self.block_size)

    def describe(self) -> str:
        return (
            f"GPU memory {self.total_bytes / GiB:.2f} GiB x --gpu-memory-utilization "
            f"{self.utilization:g} = {self.total_bytes * self.utilization / GiB:.2f} GiB: weights "
            f"{self.weights_bytes / GiB:.2f} GiB, activations {self.activation_bytes / GiB:.2f} "
            f"GiB, other {self.other_bytes / GiB:.2f} GiB, KV cache {self.kv_bytes / GiB:.2f} GiB "
            f"= {self.num_blocks} blocks of {self.block_size} tokens "
            f"({self.block_bytes / 1024:.1f} KiB each): {self.max_concurrent_seqs} sequences of "
            f"--max-model-len {self.max_model_len} at once"
        )


def plan_kv_blocks(
    total_bytes: int,
    utilization: float,
    weights_bytes: int,
    activation_bytes: int,
    other_bytes: int,
    block_bytes: int,
    block_size: int,
    max_model_len: int,
    free_bytes: int | None = None,
) -> MemoryPlan:
    """KV blocks = (total x utilization - weights - activations - other) // block bytes.

    ValueError naming the flags when that is less than one --max-model-len sequence needs, or
    when the pool plus the activations would not fit the `free_bytes` the GPU has now (other
    processes hold the rest)."""
    if block_bytes < 1 or block_size < 1:
        raise ValueError(f"block of {block_bytes} bytes and {block_size} tokens")
    budget = int(total_bytes * utilization)
    left = budget - weights_bytes - activation_bytes - other_bytes
    blocks = max(0, left // block_bytes)
    plan = MemoryPlan(total_bytes, utilization, weights_bytes, activation_bytes, other_bytes,
                      block_bytes, block_size, blocks, max_model_len)  # fmt: skip
    need = -(-max_model_len // block_size)
    if blocks < need:
        raise ValueError(
            f"--gpu-memory-utilization {utilization:g} gives {budget / GiB:.2f} GiB of the GPU's "
            f"{total_bytes / GiB:.2f} GiB; after the weights ({weights_bytes / GiB:.2f} GiB), "
            f"activations ({activation_bytes / GiB:.2f} GiB) and other memory "
            f"({other_bytes / GiB:.2f} GiB) that is {blocks} KV blocks, but one --max-model-len "
            f"{max_model_len} sequence needs {need} ({need * block_bytes / GiB:.2f} GiB): raise "
            "--gpu-memory-utilization, lower --max-model-len or --max-num-batched-tokens, or set "
            "--num-gpu-blocks-override"
        )
    if free_bytes is not None and plan.kv_bytes + activation_bytes > free_bytes:
        raise ValueError(
            f"--gpu-memory-utilization {utilization:g}: the KV cache ({plan.kv_bytes / GiB:.2f} "
            f"GiB) and activations ({activation_bytes / GiB:.2f} GiB) need more than the "
            f"{free_bytes / GiB:.2f} GiB the GPU has free (other processes hold the rest): "
            "lower --gpu-memory-utilization or set --num-gpu-blocks-override"
        )
    return plan


@dataclass(frozen=True)
class Snapshot:
    """The GPU's memory as this process sees it (bytes)."""

    used: int  # by every process on the device
    pool_total: int  # held by CuPy's memory pool, in use or cached
    pool_used: int  # of which in use


def snapshot(ops: Ops) -> Snapshot | None:
    """The GPU's memory now, or None on a backend without one (NumPy)."""
    if ops.name == "numpy":
        return None
    import cupy as cp

    free, total = cp.cuda.runtime.memGetInfo()
    pool = cp.get_default_memory_pool()
    return Snapshot(total - free, pool.total_bytes(), pool.used_bytes())


def gpu_kv_blocks(config: EngineConfig, model: Any, ops: Ops, before_load: Snapshot) -> int:
    """KV blocks for this rank's pool on its GPU (see the module doc); logs the breakdown.
    `before_load`: `snapshot(ops)` taken before the weights were loaded."""
    import cupy as cp

    bs = config.block_size
    if config.num_gpu_blocks_override:
        logger.info("KV pool: %d blocks of %d tokens (--num-gpu-blocks-override)",
                    config.num_gpu_blocks_override, bs)  # fmt: skip
        return config.num_gpu_blocks_override
    pool = cp.get_default_memory_pool()
    pool.free_all_blocks()  # what loading left cached is not the weights
    loaded = snapshot(ops)
    weights = loaded.pool_used - before_load.pool_used
    activations, block_bytes = _profile(config, model, ops)
    after = snapshot(ops)
    # growth outside the pool during the pass (the temporary KV pool is freed by now)
    other = max(0, (after.used - after.pool_total) - (loaded.used - loaded.pool_total))
    pool.free_all_blocks()
    free, total = cp.cuda.runtime.memGetInfo()
    plan = plan_kv_blocks(total, config.gpu_memory_utilization, weights, activations,
                          other + CUDA_GRAPH_MARGIN_BYTES, block_bytes, bs, config.max_model_len,
                          free_bytes=free)  # fmt: skip
    logger.info("KV pool sizing: %s", plan.describe())
    return plan.num_blocks


def _profile(config: EngineConfig, model: Any, ops: Ops) -> tuple[int, int]:
    """(activation peak, bytes per KV block) of one forward pass of the largest step the
    scheduler can make, against a temporary KV pool of just enough blocks."""
    import cupy as cp

    pool = cp.get_default_memory_pool()
    tokens = config.batched_tokens
    seqs = max(1, min(config.max_num_seqs, tokens))
    host = profile_batch(tokens, seqs, config.block_size)
    num_blocks = int(host.block_tables.max()) + 1
    kv = ops.alloc_kv_cache(model.kv_cache_shape(num_blocks, config.block_size))
    block_bytes = kv.nbytes // num_blocks
    start = pool.total_bytes()
    arrays = ("input_ids", "positions", "slot_mapping", "query_start_loc", "seq_lens",
              "block_tables", "logits_indices")  # fmt: skip
    batch = replace(host, **{f: ops.to_device(getattr(host, f)) for f in arrays})
    logits = model.forward(batch, kv)
    cp.cuda.Device().synchronize()
    peak = pool.total_bytes() - start
    del logits, batch, kv  # the KV pool (outside CuPy's pool) is freed right here
    return peak, block_bytes


def profile_batch(tokens: int, seqs: int, block_size: int) -> ForwardBatch:
    """A host batch of `tokens` prompt tokens (id 0) split evenly over `seqs` sequences, each
    with blocks of its own in a pool of just enough blocks."""
    lens = [tokens // seqs + (s < tokens % seqs) for s in range(seqs)]
    width = -(-max(lens) // block_size)
    tables = np.zeros((seqs, width), dtype=np.int32)
    positions, slots, next_block = [], [], 0
    for s, n in enumerate(lens):
        need = -(-n // block_size)
        tables[s, :need] = np.arange(next_block, next_block + need)
        next_block += need
        pos = np.arange(n, dtype=np.int64)
        positions.append(pos)
        slots.append(tables[s, pos // block_size].astype(np.int64) * block_size + pos % block_size)
    starts = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    return ForwardBatch(
        input_ids=np.zeros(tokens, dtype=np.int64),
        positions=np.concatenate(positions),
        slot_mapping=np.concatenate(slots),
        query_start_loc=starts,
        seq_lens=np.asarray(lens, dtype=np.int32),
        block_tables=tables,
        logits_indices=(starts[1:] - 1).astype(np.int64),
        block_size=block_size,
        query_start_loc_host=starts.tolist(),
        seq_lens_host=list(lens),
    )
