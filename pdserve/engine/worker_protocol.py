"""Typed messages between the engine (TP rank 0) and its worker processes (ranks 1..N-1).

They travel over the engine-worker-queue port (the engine's ROUTER, each worker a DEALER whose
routing id names its rank) through the same strict codec as every other pdserve message. The
engine decides everything: each step it sends the step's input arrays and the KV blocks each
rank must push as its layers complete; workers only compute their shard and move their KV.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import Field

from pdserve.engine.messages import MAX_MESSAGE_BYTES, MessageError
from pdserve.kvtransfer.schema import CudaIpcPool
from pdserve.wire import Codec, WireMessage

SCHEMA_VERSION = 2  # 2: KVStart.cuda_ipc
NonNeg = Annotated[int, Field(ge=0)]


class WorkerHello(WireMessage):
    """Worker -> engine, on connecting: who it is. The token proves the engine started it."""

    TYPE: ClassVar[str] = "w_hello"
    rank: NonNeg
    token: str


class WorkerReady(WireMessage):
    """Worker -> engine: its shard is loaded and its KV agent listens (or `error` says why not)."""

    TYPE: ClassVar[str] = "w_ready"
    rank: NonNeg
    error: str = ""


class KVJob(WireMessage):
    """Push prompt blocks `src_blocks` of this rank's pool, each layer as it completes, to
    destination blocks from `dst_offset` on of the transfer's destination."""

    TYPE: ClassVar[str] = "w_kv_job"
    transfer_id: str
    src_blocks: list[NonNeg]
    dst_offset: NonNeg


class WorkerStep(WireMessage):
    """Engine -> workers: one forward pass (the `ForwardBatch` rank 0 runs, as host lists)."""

    TYPE: ClassVar[str] = "w_step"
    input_ids: list[NonNeg]
    positions: list[NonNeg]
    slot_mapping: list[NonNeg]
    query_start_loc: list[NonNeg]
    seq_lens: list[NonNeg]
    block_tables: list[list[NonNeg]]
    logits_indices: list[NonNeg]
    block_size: NonNeg
    kv_jobs: list[KVJob] = Field(default_factory=list)


class WorkerCopies(WireMessage):
    """Engine -> workers: the block manager's swaps (SWAP_OUT/SWAP_IN, src, dst), in order."""

    TYPE: ClassVar[str] = "w_copies"
    copies: list[list[NonNeg]]  # [op, src, dst]


class KVStart(WireMessage):
    """Engine -> one worker: open a transfer to the decode node's rank of the same number."""

    TYPE: ClassVar[str] = "w_kv_start"
    transfer_id: str
    zmq_endpoint: str
    block_ids: list[NonNeg]
    shm_name: str = ""
    shm_shape: list[NonNeg] = Field(default_factory=list)
    shm_dtype: str = "float32"
    checksum: bool = False
    use_ipc: bool = False
    cuda_ipc: CudaIpcPool | None = None  # the decode rank's GPU pool, when in this host
    timeout_s: float


class KVFinish(WireMessage):
    TYPE: ClassVar[str] = "w_kv_finish"
    transfer_id: str
    num_layers: NonNeg
    num_blocks: NonNeg


class KVExpect(WireMessage):
    """Engine -> workers (decode role): KV of `transfer_id` will land in these blocks."""

    TYPE: ClassVar[str] = "w_kv_expect"
    transfer_id: str
    block_ids: list[NonNeg]
    num_layers: NonNeg


class KVForget(WireMessage):
    """Engine -> workers: drop a transfer (abort it as a sender, cancel it as a receiver)."""

    TYPE: ClassVar[str] = "w_kv_forget"
    transfer_id: str


class KVResult(WireMessage):
    """Worker -> engine: a transfer ended on this rank (acked by the decode rank, or landed
    here); `bytes` is this rank's share of the KV moved."""

    TYPE: ClassVar[str] = "w_kv_result"
    rank: NonNeg
    transfer_id: str
    ok: bool
    error: str = ""
    bytes: NonNeg = 0


class WorkerStop(WireMessage):
    TYPE: ClassVar[str] = "w_stop"


WorkerMessage = (
    WorkerHello | WorkerReady | WorkerStep | WorkerCopies | KVStart | KVFinish | KVExpect
    | KVForget | KVResult | WorkerStop
)  # fmt: skip

_CODEC: Codec = Codec(
    (WorkerHello, WorkerReady, WorkerStep, WorkerCopies, KVStart, KVFinish, KVExpect, KVForget,
     KVResult, WorkerStop),
    SCHEMA_VERSION, MAX_MESSAGE_BYTES, MessageError, "worker message",
)  # fmt: skip
encode = _CODEC.encode
decode = _CODEC.decode
