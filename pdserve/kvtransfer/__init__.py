"""KV-cache transfer between prefill and decode nodes: ZeroMQ frames across hosts; within one,
copies straight into the decode pool (CUDA IPC between GPU pools, POSIX shared memory between
NumPy pools); see DESIGN.md sections 2 and 4."""

from __future__ import annotations

from pdserve.kvtransfer.receiver import KVReceiver, TransferResult, kv_endpoint
from pdserve.kvtransfer.schema import CudaIpcPool, KVAck, KVDone, KVLayer, KVLayerIPC, SchemaError
from pdserve.kvtransfer.sender import Destination, KVSender, KVTransferError
from pdserve.kvtransfer.shm_pool import SharedKVPool, host_id, pool_name

__all__ = [
    "CudaIpcPool",
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
