"""The destination pools a KV sender copies into directly, opened once and cached.

A NumPy prefill pool reaches a decode pool in POSIX shared memory (attached and prefaulted once
per segment); a GPU prefill pool reaches a GPU decode pool through CUDA IPC (opened once per
endpoint, closed when that endpoint announces another pool, i.e. its node restarted). Any other
pairing, or a pool that cannot be opened, is no pool: the transfer goes over ZeroMQ, with a
warning, and `fallbacks` counts it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from pdserve.kvtransfer.device_copy import kv_dtype
from pdserve.kvtransfer.shm_pool import SharedKVPool

if TYPE_CHECKING:
    from pdserve.kvtransfer.sender import Destination

log = logging.getLogger(__name__)


class InHostPool(Protocol):
    name: str  # what `KVLayerIPC.shm_name` says the bytes went into
    array: object  # the pool [layers, 2, blocks, block_size, kv_heads, head_dim]

    def close(self) -> None: ...


class InHostPools:
    """`device`: the sender's own pool is on the GPU. `settle()` must return only once no copy
    into any pool is in flight (called before a GPU pool is unmapped)."""

    def __init__(self, device: bool, settle: Callable[[], None] = lambda: None) -> None:
        self.device = device
        self._settle = settle
        self._shm: dict[str, SharedKVPool] = {}  # segment name ->
        self._cuda: dict[str, InHostPool] = {}  # destination endpoint ->
        self.fallbacks = 0  # transfers that asked for an in-host copy but go over ZeroMQ

    def reach(self, dest: Destination) -> InHostPool | None:
        """The pool `dest` names, opened, or None (ZeroMQ it is)."""
        if dest.shm_shape is None:
            raise ValueError("an in-host copy needs the destination pool's shape (shm_shape)")
        if self.device and dest.cuda_ipc is not None:
            return self._open_cuda(dest)
        if not self.device and dest.shm_name:
            return self._attach_shm(dest)
        mine = "on the GPU" if self.device else "in host memory"
        return self._fallback(dest, f"this node's KV pool is {mine}, the destination's is not")

    def __len__(self) -> int:
        return len(self._shm) + len(self._cuda)

    def close(self) -> None:
        if self._cuda:
            self._settle()
        for pool in (*self._shm.values(), *self._cuda.values()):
            pool.close()
        self._shm.clear()
        self._cuda.clear()

    def _fallback(self, dest: Destination, why: str) -> None:
        self.fallbacks += 1
        log.warning("KV to %s goes over ZeroMQ: %s", dest.zmq_endpoint, why)
        return None

    def _attach_shm(self, dest: Destination) -> InHostPool | None:
        name = dest.shm_name
        pool = self._shm.get(name)
        stale = pool is not None and (
            not pool.is_current() or pool.array.shape != tuple(dest.shm_shape)
        )  # the receiver restarted and made a new segment of that name
        if stale:
            self._shm.pop(name).close()
            pool = None
        if pool is None:
            try:
                pool = SharedKVPool.attach(name, dest.shm_shape, dest.shm_dtype)
            except (OSError, ValueError) as e:
                return self._fallback(dest, f"cannot attach shared memory {name} ({e})")
            pool.prefault()
            self._shm[name] = pool
        return pool

    def _open_cuda(self, dest: Destination) -> InHostPool | None:
        from pdserve.kvtransfer.cuda_ipc import OpenedPool, ipc_pool_name

        endpoint, ipc = dest.zmq_endpoint, dest.cuda_ipc
        pool = self._cuda.get(endpoint)
        if pool is not None and (
            pool.name != ipc_pool_name(ipc.handle) or pool.array.shape != tuple(dest.shm_shape)
        ):  # another pool behind that endpoint: its node restarted
            self._settle()
            self._cuda.pop(endpoint).close()
            pool = None
        if pool is None:
            try:
                pool = OpenedPool(ipc, dest.shm_shape, kv_dtype(dest.shm_dtype))
            except (RuntimeError, ValueError, ImportError) as e:
                return self._fallback(dest, f"cannot open its CUDA IPC pool ({e})")
            log.info("opened the CUDA IPC KV pool of %s (%d bytes)", endpoint, ipc.nbytes)
            self._cuda[endpoint] = pool
        return pool
