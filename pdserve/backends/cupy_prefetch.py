"""Weights brought into L2 ahead of the decode launches that stream them (csrc/prefetch.cu).

At small decode batches each weight-streaming launch reads its matrix below the copy rate (every
warp waits on DRAM between its load groups), and the latency-bound launches between them
(attention, norms, routing) leave the memory idle. `Ops.prefetch` hints name the weights read
soon; inside decode-graph capture CupyOps starts an L2 prefetch of them on a detached side
stream (`Kernels.detach`), so DRAM works while the latency-bound launches run and the streaming
launch then reads from L2. The streaming kernels' loads ask L2 to evict their own lines first
(`cupy_kernels.EVICT_FIRST`), which should keep the prefetched lines alive across a layer's
experts.

Status: off by default. A first version (a thread per 128-byte line over a block per SM, on the
side stream) made batch-1 decode 13% slower on an H100 (benchmarks/RESULTS.md, session 7); this
one (one small block of bulk prefetches per hint, detached or inline) has not run on a GPU yet:
tests/gpu/test_cupy_prefetch.py and the A/B in RESULTS.md come first. The switches are module
constants so benchmarks can A/B them in one process (benchmarks/ab_decode_graph.py,
profile_decode_graph.py --set).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import cupy as cp
import numpy as np

from pdserve.backends.cupy_kernels import Kernels

ENABLED = 0  # Ops.prefetch hints start prefetches (decode graphs only); off until measured
# The routed experts' down matrices are prefetched while gate_up streams when the touched ones
# add up to at most this many bytes (a few experts: batch 1 to a few tokens). Larger batches keep
# DRAM busy on their own, and the L2 (50-60 MB) would not hold them.
EXPERTS_MAX_BYTES = 48 << 20
# One hint prefetches its arrays in order while they add up to at most this many bytes (what
# L2 holds beside the lines in use: 50 MB on an H100, 60 MB on an H200).
MAX_BYTES = 48 << 20
# Where prefetches run: 0, a detached side stream (a parallel branch of the graph); 1, the
# current stream, in its launch chain (the prefetch kernels let the next kernel launch at once).
INLINE = 0
DRY_RUN = 0  # launch the prefetch kernels with nothing to fetch (what the launches alone cost)
THREADS = 64  # a block's threads: each issues bulk prefetches of 32 KiB (csrc/prefetch.cu)
MAX_RANGES = 4  # byte ranges one l2_prefetch launch takes


def l2(k: Kernels, arrays: Sequence[cp.ndarray]) -> None:
    """Prefetch `arrays` (contiguous device arrays), as many of the first as MAX_BYTES allows,
    into L2 on the current stream: one single-block launch per four arrays."""
    ranges, total = [], 0
    for a in arrays:
        total += a.nbytes
        if total > MAX_BYTES:
            break
        ranges.append((a.data.ptr, 0 if DRY_RUN else a.nbytes))
    for i in range(0, len(ranges), MAX_RANGES):
        chunk = (ranges[i : i + MAX_RANGES] + [(0, 0)] * MAX_RANGES)[:MAX_RANGES]
        args = [v for ptr, n in chunk for v in (np.uint64(ptr), np.int64(n))]
        k.launch("prefetch.cu", "l2_prefetch", (1,), THREADS, tuple(args))


def start(k: Kernels, fn: Callable[..., None], *args: object) -> None:
    """fn(*args), a prefetch, where INLINE says."""
    if INLINE:
        fn(*args)
    else:
        k.detach(fn, *args)


def expert_matrices(k: Kernels, slot_expert: cp.ndarray, stacked: cp.ndarray) -> None:
    """Prefetch the matrices stacked[e] ([E, ...], contiguous) of the experts that
    `slot_expert` (moe_group's, on the device) names, on the current stream."""
    slots = int(slot_expert.shape[0])
    if slots == 0:
        return
    per = stacked[0].nbytes
    k.launch("prefetch.cu", "l2_prefetch_experts", (slots,), THREADS,
             (slot_expert, np.uint64(stacked.data.ptr), np.int64(per),
              np.int64(0 if DRY_RUN else per)))  # fmt: skip


def experts_fit(slots: int, stacked: cp.ndarray) -> bool:
    """Whether `slots` experts' matrices of `stacked` are few enough to prefetch."""
    return slots * stacked[0].nbytes <= EXPERTS_MAX_BYTES
