"""CUDA IPC for KV pools: the in-host transport between GPU nodes (DESIGN.md sections 2, 5a).

A decode rank exports its pool (`export_pool`): the 64-byte `cudaIpcMemHandle_t` of the
allocation that holds it, the pool's offset inside that allocation and its size. An in-host
prefill rank opens it once (`OpenedPool`), copies finished layers straight into it on a side
stream (device_copy.DeviceStager), and closes it when the pool is no longer used.

`cudaIpcGetMemHandle` names a whole allocation, not the pointer given, so the offset comes from
`cuMemGetAddressRange`: a pool inside a larger allocation (e.g. one from CuPy's memory pool)
would otherwise open at the allocation's start. Importable without CuPy.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from pdserve.kvtransfer.schema import CudaIpcPool, check_ipc_handle

log = logging.getLogger(__name__)


def ipc_pool_name(handle: bytes) -> str:
    """The name a receiver and its in-host senders use for a GPU pool (in `KVLayerIPC`
    headers): derived from its handle, so a restarted node's new pool gets a new name."""
    return "cuda_ipc_" + hashlib.sha256(check_ipc_handle(handle)).hexdigest()[:16]


@functools.cache
def _libcuda() -> ctypes.CDLL:
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuMemGetAddressRange_v2.argtypes = [
        ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t), ctypes.c_uint64,
    ]  # fmt: skip
    lib.cuMemGetAddressRange_v2.restype = ctypes.c_int
    return lib


def address_range(ptr: int) -> tuple[int, int]:
    """(base, size in bytes) of the allocation holding device address `ptr`, from the driver;
    RuntimeError if the driver does not know it."""
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    status = _libcuda().cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ptr)
    if status != 0:
        raise RuntimeError(f"cuMemGetAddressRange({ptr:#x}) failed with CUresult {status}")
    return base.value, size.value


def export_pool(pool: Any) -> CudaIpcPool:
    """The CUDA IPC description of a CuPy KV pool (C-contiguous, on this process's GPU)."""
    import cupy as cp

    if not pool.flags.c_contiguous:
        raise ValueError("only a C-contiguous KV pool can be shared through CUDA IPC")
    base, size = address_range(pool.data.ptr)
    offset = pool.data.ptr - base
    if offset + pool.nbytes > size:
        raise ValueError(f"KV pool of {pool.nbytes} bytes at offset {offset} overruns its "
                         f"allocation of {size} bytes")  # fmt: skip
    if offset:
        log.warning("the KV pool sits %d bytes into its allocation; peers open it there", offset)
    handle = cp.cuda.runtime.ipcGetMemHandle(base)
    return CudaIpcPool(handle=handle, offset=offset, nbytes=pool.nbytes)


class OpenedPool:
    """Another process's KV pool, mapped into this one: `.array` is a CuPy array of `shape`
    and `dtype` over it. ValueError if the exported size is not that of `shape` x `dtype`
    (a pool of another layout would scatter every write); RuntimeError (CUDA's) if the handle
    cannot be opened (its process is gone, or it is this process's own)."""

    def __init__(self, pool: CudaIpcPool, shape: Sequence[int], dtype: np.dtype) -> None:
        import cupy as cp

        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if nbytes != pool.nbytes:
            raise ValueError(f"CUDA IPC pool of {pool.nbytes} bytes, {tuple(shape)} "
                             f"{np.dtype(dtype).name} is {nbytes}")  # fmt: skip
        self.name = ipc_pool_name(pool.handle)
        self._base: int | None = cp.cuda.runtime.ipcOpenMemHandle(pool.handle)
        try:
            _, size = address_range(self._base)
            if pool.offset + nbytes > size:
                raise ValueError(f"CUDA IPC pool at offset {pool.offset} of {nbytes} bytes "
                                 f"overruns the {size} bytes mapped")  # fmt: skip
        except (RuntimeError, ValueError):
            self.close()
            raise
        mem = cp.cuda.UnownedMemory(self._base + pool.offset, nbytes, self)
        self.array: Any = cp.ndarray(tuple(shape), dtype, cp.cuda.MemoryPointer(mem, 0))

    def close(self) -> None:
        """Unmap. The caller first waits for the copies into it (DeviceStager.synchronize)."""
        self.array = None
        if self._base is not None:
            import cupy as cp

            try:
                cp.cuda.runtime.ipcCloseMemHandle(self._base)
            except cp.cuda.runtime.CUDARuntimeError as e:
                log.warning("closing CUDA IPC pool %s: %s", self.name, e)
            self._base = None
