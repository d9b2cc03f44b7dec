"""A KV pool in POSIX shared memory: the in-host transport's memory on the NumPy backend.

The decode node's engine owns the segment (`SharedKVPool.create`) and serves from its `.array`;
an in-host prefill node attaches to it (`SharedKVPool.attach`) and copies layers straight in,
the part CUDA IPC plays on GPUs. Only the owner unlinks. An attacher never registers the segment
with Python's resource tracker, so its exit cannot unlink the owner's segment.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import re
import socket
import sys
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory

import numpy as np

log = logging.getLogger(__name__)

MAX_NAME_CHARS = 30  # macOS allows 31 with the leading slash; Linux 255
_SAFE = re.compile(r"[A-Za-z0-9_.-]*")


def pool_name(prefix: str, port: int) -> str:
    """The shared-memory name of the KV pool behind KV endpoint `port` (cache-queue-port + rank)
    of the node whose INFERENCE_MSG_QUEUE_ID is `prefix`: `pdkv_<prefix>_<port>`, with the
    prefix replaced by a hash of it when it is long or has characters a name cannot hold."""
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an int in [0, 65535], got {port!r}")
    name = f"pdkv_{prefix}_{port}"
    if len(name) > MAX_NAME_CHARS or not _SAFE.fullmatch(prefix):
        name = f"pdkv_{hashlib.sha256(prefix.encode()).hexdigest()[:12]}_{port}"
    return name


def host_id() -> str:
    """An id shared exactly by processes that can open each other's shared memory.

    On Linux: the kernel's boot id and the device of /dev/shm, so two containers on one host
    match only when they share /dev/shm (e.g. `--ipc=host`); elsewhere the hostname and MAC.
    Stable until a reboot; compare it, do not parse it."""
    parts: list[str] = []
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            parts.append(f.read().strip())
        parts.append(str(os.stat("/dev/shm").st_dev))
    except OSError:
        parts = [socket.gethostname(), str(uuid.getnode())]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _nbytes(shape: Sequence[int], dtype: np.dtype) -> int:
    if any(not isinstance(d, int | np.integer) or d < 0 for d in shape):
        raise ValueError(f"shape must be non-negative ints, got {shape!r}")
    return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


@contextmanager
def _untracked() -> Iterator[None]:
    """Keep SharedMemory (< 3.13) from registering an attached segment with the resource
    tracker. Registering and unregistering afterwards is not enough: the tracker keeps one
    entry per name, shared by the owner and its multiprocessing children, so the attacher's
    unregister would also drop the owner's entry (no clean-up if the owner crashes, and a
    KeyError traceback when it unlinks)."""
    register = resource_tracker.register
    resource_tracker.register = lambda name, rtype: None
    try:
        yield
    finally:
        resource_tracker.register = register


class SharedKVPool:
    """A numpy array of `shape` and `dtype` (e.g. the KV pool
    `[layers, 2, blocks, block_size, kv_heads, head_dim]`) in one POSIX shared memory segment."""

    def __init__(self, shm: SharedMemory, shape: Sequence[int], dtype: np.dtype, owner: bool):
        self._shm = shm
        self.name = shm.name.lstrip("/")
        self.owner = owner
        self.array: np.ndarray | None = np.ndarray(tuple(shape), dtype=dtype, buffer=shm.buf)

    @classmethod
    def create(
        cls,
        name: str,
        shape: Sequence[int],
        dtype: np.dtype | type | str = np.float32,
        replace: bool = False,
    ) -> SharedKVPool:
        """Allocate a zero-filled segment (the kernel zero-fills it; no page is touched here).
        `replace` first unlinks a leftover segment of that name (one a killed node left)."""
        dt = np.dtype(dtype)
        size = max(_nbytes(shape, dt), 1)
        if replace:
            try:
                old = SharedMemory(name=name)
            except FileNotFoundError:
                pass
            else:
                log.warning("unlinking leftover shared memory %s (%d bytes)", name, old.size)
                old.close()
                old.unlink()
        shm = SharedMemory(name=name, create=True, size=size)
        return cls(shm, shape, dt, owner=True)

    @classmethod
    def attach(
        cls, name: str, shape: Sequence[int], dtype: np.dtype | type | str = np.float32
    ) -> SharedKVPool:
        """Open an existing segment; FileNotFoundError if there is none, ValueError if its
        size is not that of `shape` x `dtype` (a pool of another shape: the block axis sits in
        the middle, so a wrong shape would scatter every write)."""
        dt = np.dtype(dtype)
        nbytes = max(_nbytes(shape, dt), 1)
        if sys.version_info >= (3, 13):
            shm = SharedMemory(name=name, track=False)
        else:
            with _untracked():
                shm = SharedMemory(name=name)
        if shm.size not in (nbytes, -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE):  # macOS rounds
            shm.close()
            raise ValueError(
                f"shared memory {name} has {shm.size} bytes, {tuple(shape)} {dt} is {nbytes}"
            )
        return cls(shm, shape, dt, owner=False)

    @property
    def nbytes(self) -> int:
        return 0 if self.array is None else self.array.nbytes

    def prefault(self) -> None:
        """Map every page into this process now (one read per 4 KiB page; ~0.1 s per GB), so
        that later copies do not each stop on page faults (they ran ~8x slower cold)."""
        if self.array is not None and self.array.size:
            flat = self.array.reshape(-1).view(np.uint8)
            int(flat[:: mmap.PAGESIZE].sum())

    def is_current(self) -> bool:
        """Whether the name still leads to this mapping (False once the owner unlinked it, e.g.
        a restarted node that made a new segment of the same name). Checked through /dev/shm
        on Linux; elsewhere always True."""
        path = f"/dev/shm/{self.name}"
        if not os.path.isdir("/dev/shm"):
            return True
        try:
            named = os.stat(path)
        except FileNotFoundError:
            return False
        mine = os.fstat(self._shm._fd)  # SharedMemory keeps its descriptor open until close()
        return (named.st_dev, named.st_ino) == (mine.st_dev, mine.st_ino)

    def close(self) -> None:
        """Unmap this process's view. Arrays derived from `.array` must be gone by then;
        if some remain, the mapping stays until they are (a warning says so)."""
        self.array = None
        try:
            self._shm.close()
        except BufferError:
            log.warning("shared memory %s still has views; unmapped when they go", self.name)

    def unlink(self) -> None:
        """Remove the segment's name (the owner's job); mappings stay valid until closed."""
        if not self.owner:
            raise RuntimeError(f"only the owner may unlink shared memory {self.name}")
        self._shm.unlink()

    def __enter__(self) -> SharedKVPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        if self.owner:
            self.unlink()
