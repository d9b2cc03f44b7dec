"""Wire schema of the KV transfer: typed frame headers and their one codec.

A message is one msgpack header frame (a map with `type`, the schema version `v` and the
header's fields), followed for `KVLayer` by one raw payload frame: the layer's KV of the listed
blocks, C-contiguous, `shape = [2, n_blocks, block_size, kv_heads, head_dim]` of `dtype`.
Decoding bounds the size and checks the version, the type and every field strictly (pydantic),
so a malformed or foreign frame is rejected, never half-applied. Nothing is ever unpickled.

`CudaIpcPool` names a decode rank's GPU KV pool for in-host senders; it travels inside the
engine's and workers' messages (and as KVDestination's cuda_ipc_* fields over gRPC), never in
KV frames.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Annotated, ClassVar

import numpy as np
from pydantic import AfterValidator, Field

from pdserve.kvtransfer.device_copy import host_blocks, is_device_array
from pdserve.wire import Codec, WireMessage

SCHEMA_VERSION = 1
MAX_HEADER_BYTES = 1 << 20  # bytes; 32k tokens in 64-token blocks is 512 ids, ~3 KB
MAX_ID_CHARS = 256
IPC_HANDLE_BYTES = 64  # sizeof(cudaIpcMemHandle_t)

NonNeg = Annotated[int, Field(ge=0)]
TransferId = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]


class SchemaError(ValueError):
    """A frame that is not a valid KV transfer header of this schema version."""


def check_ipc_handle(handle: object) -> bytes:
    """`handle` if it is a CUDA IPC memory handle (64 bytes), else ValueError saying why."""
    if not isinstance(handle, bytes | bytearray):
        raise ValueError(f"a CUDA IPC memory handle is {IPC_HANDLE_BYTES} bytes, "
                         f"got a {type(handle).__name__}")  # fmt: skip
    if len(handle) != IPC_HANDLE_BYTES:
        raise ValueError(f"a CUDA IPC memory handle is {IPC_HANDLE_BYTES} bytes, got {len(handle)}")
    return bytes(handle)


IpcHandle = Annotated[bytes, AfterValidator(check_ipc_handle)]


class CudaIpcPool(WireMessage):
    """Where a decode rank's KV pool lives on its GPU, for an in-host sender to open: the CUDA
    IPC handle of the allocation holding it, the pool's offset in it and its size (bytes)."""

    handle: IpcHandle
    offset: NonNeg  # bytes from the allocation's base to the pool's first element
    nbytes: NonNeg  # [layers, 2, blocks, block_size, kv_heads, head_dim] x the KV dtype


_Header = WireMessage


class KVLayer(_Header):
    """One layer of some blocks of a transfer; the payload follows in the next frame."""

    TYPE: ClassVar[str] = "kv_layer"
    transfer_id: TransferId
    layer: NonNeg
    block_ids: list[NonNeg]  # destination block ids, in payload order
    dtype: str  # numpy dtype name of the payload ("float32", "bfloat16", "uint16")
    shape: list[NonNeg]  # [2, len(block_ids), block_size, kv_heads, head_dim]
    checksum: Annotated[int, Field(ge=0, le=0xFFFFFFFF)] | None = None  # zlib.crc32 of payload


class KVLayerIPC(KVLayer):
    """Like `KVLayer`, but the sender already copied the bytes into the receiver's
    shared-memory pool, so no payload frame follows; the checksum covers the pool's bytes."""

    TYPE: ClassVar[str] = "kv_layer_ipc"
    # the pool the bytes went into: its shared-memory name, or `cuda_ipc.ipc_pool_name`
    shm_name: Annotated[str, Field(max_length=MAX_ID_CHARS)]


class KVDone(_Header):
    """The sender has sent every layer frame of the transfer."""

    TYPE: ClassVar[str] = "kv_done"
    transfer_id: TransferId
    num_layers: NonNeg
    num_blocks: NonNeg  # destination blocks the transfer filled


class KVAck(_Header):
    """The receiver's verdict on a transfer: ok once every expected layer x block landed."""

    TYPE: ClassVar[str] = "kv_ack"
    transfer_id: TransferId
    ok: bool
    error: str = ""


Header = KVLayer | KVLayerIPC | KVDone | KVAck


def checksum(data: np.ndarray | bytes | memoryview, value: int = 0) -> int:
    """zlib.crc32 of the bytes of an array (in C order) or buffer, continuing from `value`."""
    if isinstance(data, np.ndarray):
        data = data.reshape(-1).view(np.uint8)  # also for dtypes the buffer protocol lacks
    return zlib.crc32(data, value)


def blocks_checksum(layer_kv: np.ndarray, block_ids: Sequence[int]) -> int:
    """`checksum` of the payload `np.take(layer_kv, block_ids, axis=1)` [2, n, block_size,
    kv_heads, head_dim], computed block by block from `layer_kv` [2, blocks, ...] in place
    (a GPU pool's blocks are copied to the host first: checksums are a debugging aid)."""
    if is_device_array(layer_kv):
        return checksum(host_blocks(layer_kv, block_ids))
    value = 0
    for kv in layer_kv:
        for b in block_ids:
            value = checksum(kv[b], value)
    return value


_CODEC: Codec = Codec((KVLayer, KVLayerIPC, KVDone, KVAck), SCHEMA_VERSION, MAX_HEADER_BYTES,
                      SchemaError, "header")  # fmt: skip
encode = _CODEC.encode
decode = _CODEC.decode
