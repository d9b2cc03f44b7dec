"""KV-cache transfer between prefill and decode nodes: ZeroMQ frames across hosts, shared
memory (CUDA IPC's stand-in on the NumPy backend) within one; see DESIGN.md sections 2 and 4."""

from __future__ import annotations

from pdserve.kvtransfer.receiver import KVReceiver, TransferResult, kv_endpoint
from pdserve.kvtransfer.schema import KVAck, KVDone, KVLayer, KVLayerIPC, SchemaError
from pdserve.kvtransfer.sender import Destination, KVSender, KVTransferError
from pdserve.kvtransfer.shm_pool import SharedKVPool, host_id, pool_name

__all__ = [
    "Destination",
    "KVAck",
    "KVDone",
    "KVLayer",
    "KVLayerIPC",
    "KVReceiver",
    "KVSender",
    "KVTransferError",
    "SchemaError",
    "SharedKVPool",
    "TransferResult",
    "host_id",
    "kv_endpoint",
    "pool_name",
]
