"""Decode steps under CUDA graphs: one graph per batch-size bucket, captured once, replayed.

A decode batch (every sequence adds one token) of n sequences replays the graph of the smallest
bucket >= n; rows past n are padding (token 0 at position 0, context 1, KV slot -1 so nothing is
written). A graph reads its inputs from static device buffers that one host-to-device copy fills
from pinned memory, and leaves its logits in a buffer of its own. Captured work allocates from a
private memory pool that every graph shares: graphs never run at the same time, and only their
logits outlive a replay. Capturing needs every op on the path to launch without reading device
values on the host, with launch sizes from array shapes only (so `ForwardBatch`'s host copies of
its lengths are None here), and cuBLAS through `cublas_capturable`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import cupy as cp
import numpy as np

from pdserve.model.forward_batch import ForwardBatch

log = logging.getLogger(__name__)

Forward = Callable[[ForwardBatch, Any], Any]  # (batch, kv_cache) -> logits [L, V]


def _align16(nbytes: int) -> int:
    return -(-nbytes // 16) * 16


class _StaticInputs:
    """One bucket's inputs: a pinned host staging buffer and its device twin, both carved into
    the ForwardBatch arrays, so one copy uploads a step."""

    def __init__(self, size: int, width: int) -> None:
        self.size, self.width = size, width
        # every array starts on 16 bytes, as the kernels' arguments must (row_major would
        # otherwise copy a misaligned one inside every layer of the graph)
        self._layout = [("input_ids", np.int64, size), ("positions", np.int64, size),
                        ("slot_mapping", np.int64, size), ("logits_indices", np.int64, size),
                        ("query_start_loc", np.int32, size + 1), ("seq_lens", np.int32, size),
                        ("block_tables", np.int32, size * width)]  # fmt: skip
        self.nbytes = sum(_align16(np.dtype(dt).itemsize * n) for _, dt, n in self._layout)
        self._pinned = cp.cuda.alloc_pinned_memory(self.nbytes)
        self._device = cp.cuda.Memory(self.nbytes)  # outside every pool: lives with the graph
        raw = np.frombuffer(self._pinned, np.uint8, self.nbytes)
        self.host: dict[str, np.ndarray] = {}
        self.dev: dict[str, cp.ndarray] = {}
        offset = 0
        for name, dt, n in self._layout:
            nb = np.dtype(dt).itemsize * n
            self.host[name] = raw[offset : offset + nb].view(dt)
            ptr = cp.cuda.MemoryPointer(self._device, offset)
            self.dev[name] = cp.ndarray((n,), dt, ptr)
            offset += _align16(nb)
        self.host["block_tables"] = self.host["block_tables"].reshape(size, width)
        self.dev["block_tables"] = self.dev["block_tables"].reshape(size, width)
        self.host["query_start_loc"][:] = np.arange(size + 1)  # one token per row, always
        self.host["logits_indices"][:] = np.arange(size)
        self._uploaded: cp.cuda.Event | None = None
        self.write(None)

    def write(self, batch: ForwardBatch | None) -> None:
        """Stage a decode batch of n <= size sequences (None: all padding)."""
        if self._uploaded is not None:
            self._uploaded.synchronize()  # the last upload has left the staging buffer
        h, n = self.host, 0 if batch is None else batch.num_seqs
        for name, pad in (("input_ids", 0), ("positions", 0), ("slot_mapping", -1),
                          ("seq_lens", 1)):  # fmt: skip
            h[name][n:] = pad
            if n:
                h[name][:n] = getattr(batch, name)
        h["block_tables"][:] = 0
        if n:
            tables = batch.block_tables
            h["block_tables"][:n, : tables.shape[1]] = tables

    def upload(self, stream: cp.cuda.Stream) -> None:
        cp.cuda.runtime.memcpyAsync(self._device.ptr, self._pinned.ptr, self.nbytes,
                                    cp.cuda.runtime.memcpyHostToDevice, stream.ptr)  # fmt: skip
        self._uploaded = stream.record()

    def batch(self, block_size: int) -> ForwardBatch:
        d = self.dev
        return ForwardBatch(d["input_ids"], d["positions"], d["slot_mapping"],
                            d["query_start_loc"], d["seq_lens"], d["block_tables"],
                            d["logits_indices"], block_size)  # fmt: skip


@dataclass
class _Graph:
    graph: Any  # cupy.cuda.Graph
    inputs: _StaticInputs
    logits: cp.ndarray  # [size, V] float32, written by every replay


class DecodeGraphs:
    """The decode graphs of one model and KV pool. `run` replays one, or returns None when a
    batch does not fit any (not pure decode, too many sequences, a longer block table)."""

    def __init__(self, forward: Forward, kv_cache: Any, block_size: int, max_blocks_per_seq: int,
                 sizes: Sequence[int]) -> None:  # fmt: skip
        if not sizes or min(sizes) < 1:
            raise ValueError(f"CUDA graph capture sizes must be >= 1, got {list(sizes)}")
        self.forward = forward
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.width = max_blocks_per_seq
        self.sizes = sorted(set(sizes))
        self.pool = cp.cuda.MemoryPool()
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.graphs: dict[int, _Graph] = {}

    @property
    def max_size(self) -> int:
        return self.sizes[-1]

    def capture(self) -> None:
        """Capture every bucket, largest first so the private pool grows only once."""
        start = time.perf_counter()
        for size in reversed(self.sizes):
            self.graphs[size] = self._capture(size)
        log.info("captured %d decode CUDA graphs (batch %s) in %.2f s, %.0f MiB of activations",
                 len(self.sizes), ",".join(map(str, self.sizes)), time.perf_counter() - start,
                 self.pool.total_bytes() / 2**20)  # fmt: skip

    def _capture(self, size: int) -> _Graph:
        inputs = _StaticInputs(size, self.width)
        batch = inputs.batch(self.block_size)
        with cp.cuda.using_allocator(self.pool.malloc), self.stream:
            inputs.upload(self.stream)
            self.forward(batch, self.kv_cache)  # compiles kernels, sizes the pool
            self.stream.synchronize()
            self.stream.begin_capture()
            try:
                logits = self.forward(batch, self.kv_cache)
            finally:
                graph = self.stream.end_capture()
        if hasattr(graph, "upload"):  # instantiate now rather than at the first replay
            graph.upload(self.stream)
        self.stream.synchronize()
        return _Graph(graph, inputs, logits)

    def fits(self, batch: ForwardBatch) -> bool:
        n = batch.num_seqs
        return (
            0 < n <= self.max_size
            and batch.num_tokens == n
            and int(batch.logits_indices.shape[0]) == n
            and batch.block_tables.shape[1] <= self.width
        )

    def run(self, batch: ForwardBatch) -> cp.ndarray | None:
        """Logits [n, V] float32 of a host-side decode batch of n sequences, or None."""
        if not self.fits(batch):
            return None
        n = batch.num_seqs
        g = self.graphs[next(s for s in self.sizes if s >= n)]
        g.inputs.write(batch)
        stream = cp.cuda.get_current_stream()
        g.inputs.upload(stream)
        g.graph.launch(stream)
        return g.logits[:n]
