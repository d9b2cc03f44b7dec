"""Typed messages between a node's frontend and its engine process, and their one codec.

On the wire a message is one msgpack frame: a map with `type`, the schema version `v`, and the
message's fields. Decoding checks the size, the version, the type and every field's type (through
pydantic, strictly), so a malformed or foreign message is rejected, never half-applied. Nothing is
ever unpickled.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from pdserve.kvtransfer.schema import CudaIpcPool
from pdserve.wire import Codec, WireMessage

SCHEMA_VERSION = 2  # 2: CUDA IPC pools (KVPushSpec.cuda_ipc, EngineReady.kv_cuda_ipc)
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # a 1M-token prompt is ~5 MB of msgpack ints


class MessageError(ValueError):
    """A frame that is not a valid message of this schema version."""


_Msg = WireMessage


class KVPushSpec(_Msg):
    """Prefill role: where to push a prompt's KV (rank r's shard to decode rank r)."""

    transfer_id: str
    zmq_endpoints: list[str]  # per decode rank r: its KV receiver, tcp://host:cache-queue-port+r
    shm_names: list[str] = Field(default_factory=list)  # per rank: its pool in POSIX shared
    # memory, when it shares our host
    pool_blocks: int = 0  # blocks in that pool (it may differ from ours)
    cuda_ipc: list[CudaIpcPool] = Field(default_factory=list)  # per rank: its pool on its GPU,
    # when it shares our host
    host_id: str = ""
    block_ids: list[int]  # destination blocks, one per prompt block from first_block on
    first_block: int  # prompt blocks before this one the decode node has cached
    checksum: bool = False


class AddRequest(_Msg):
    TYPE: ClassVar[str] = "add"
    request_id: str
    prompt_token_ids: list[int]
    params: dict[str, Any]  # SamplingParams fields; SamplingParams(**params) validates them
    eos_token_ids: list[int] = Field(default_factory=list)
    remote_prefill: bool = False  # decode role: hold blocks, the prompt's KV comes from afar
    transfer_id: str = ""  # decode role: the id the KV frames will carry
    kv_push: KVPushSpec | None = None  # prefill role


class AbortRequests(_Msg):
    TYPE: ClassVar[str] = "abort"
    request_ids: list[str]
    ack: bool = False  # answer with Aborted once done (no step touches them any more)


class Aborted(_Msg):
    TYPE: ClassVar[str] = "aborted"
    request_ids: list[str]


class Shutdown(_Msg):
    TYPE: ClassVar[str] = "shutdown"
    drain_seconds: float = 0.0  # finish in-flight requests for up to this long first


class TokenOut(_Msg):
    """One token of one request, as the engine produced it."""

    request_id: str
    token_id: int
    logprob: float
    top_ids: list[int] | None
    top_logprobs: list[float] | None
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int


class EngineStats(_Msg):
    num_running: int = 0
    num_waiting: int = 0
    num_free_blocks: int = 0
    num_blocks: int = 0
    kv_usage: float = 0.0
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache, cumulative
    prefix_hits: int = 0  # of which found, cumulative
    num_preemptions: int = 0  # cumulative
    queued_prefill_tokens: int = 0  # prompt tokens admitted or waiting, not yet computed
    num_host_blocks: int = 0  # --swap-space tier size
    swapped_in: int = 0  # blocks brought back from the host tier, cumulative
    swapped_out: int = 0  # blocks saved to the host tier on eviction, cumulative


class StepOutputs(_Msg):
    TYPE: ClassVar[str] = "outputs"
    outputs: list[TokenOut]
    stats: EngineStats


class RequestFailed(_Msg):
    """The engine refused or dropped a request (e.g. it cannot fit the KV pool)."""

    TYPE: ClassVar[str] = "failed"
    request_id: str
    message: str
    unavailable: bool = False  # a serving failure (HTTP 503), not bad input (400)
    prefill_failed: bool = False  # the remote prefill failed (the decode node is fine)


class EngineReady(_Msg):
    TYPE: ClassVar[str] = "ready"
    num_blocks: int
    block_size: int
    max_model_len: int
    kv_shm_name: str = ""  # decode role: the KV pool's shared-memory name
    kv_shm_names: list[str] = Field(default_factory=list)  # decode role: per TP rank
    kv_cuda_ipc: list[CudaIpcPool] = Field(default_factory=list)  # decode role, GPU: per rank
    host_id: str = ""
    kv_dtype: str = "float32"
    backend: str = ""  # the compute backend --backend resolved to


class RemoteKVReady(_Msg):
    """Decode role: blocks are held for a remote prefill; these are the destinations."""

    TYPE: ClassVar[str] = "remote_ready"
    request_id: str
    transfer_id: str
    first_block: int
    block_ids: list[int]
    num_cached_tokens: int


class RemotePrefillDone(_Msg):
    """Decode role, from the frontend: the prefill node replied (ok) or failed."""

    TYPE: ClassVar[str] = "remote_done"
    request_id: str
    ok: bool
    token_id: int = 0
    logprob: float = 0.0
    fallback_local: bool = True  # when not ok: recompute here, else fail the request


class RemoteRetry(_Msg):
    """Decode role, from the frontend: the prefill is retried elsewhere under a new transfer id;
    the engine answers with RemoteKVReady once it expects that id (and drops the old one's)."""

    TYPE: ClassVar[str] = "remote_retry"
    request_id: str
    transfer_id: str


class PrefillDone(_Msg):
    """Prefill role: the prompt's KV is acknowledged by the decode node (ok) or not."""

    TYPE: ClassVar[str] = "prefill_done"
    request_id: str
    ok: bool
    error: str = ""
    output: TokenOut | None = None
    kv_bytes: int = 0
    transport: str = ""


class PeerInfoRequest(_Msg):
    """An in-host peer (a decode node given --innode-prefill-ports) asks the engine on its
    engine-worker-queue port who it is."""

    TYPE: ClassVar[str] = "peer_info?"


class PeerInfo(_Msg):
    TYPE: ClassVar[str] = "peer_info"
    role: str
    host: str
    pd_comm_port: int


class PeerError(_Msg):
    TYPE: ClassVar[str] = "peer_error"
    message: str


_ALL = (PeerInfoRequest, PeerInfo, PeerError, AddRequest, AbortRequests, Aborted, Shutdown,
        StepOutputs,
        RequestFailed, EngineReady, RemoteKVReady, RemotePrefillDone, RemoteRetry,
        PrefillDone)  # fmt: skip
Message = (
    AddRequest | AbortRequests | Aborted | Shutdown | StepOutputs | RequestFailed | EngineReady
    | RemoteKVReady | RemotePrefillDone | RemoteRetry | PrefillDone | PeerInfoRequest | PeerInfo
    | PeerError
)  # fmt: skip


_CODEC: Codec = Codec(_ALL, SCHEMA_VERSION, MAX_MESSAGE_BYTES, MessageError)
encode = _CODEC.encode
decode = _CODEC.decode
