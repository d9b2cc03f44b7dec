"""The GPU backend's plumbing: bf16 on host and device, csrc/*.cu kernels compiled by NVRTC on
first use, and cuBLAS GEMMs with float32 accumulation.

bfloat16 device arrays have CuPy's bfloat16 dtype (NumPy's extension type from ml_dtypes);
kernels see them as raw 16-bit words (`bf16_t` in csrc/common.cuh).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cupy as cp
import ml_dtypes
import numpy as np

from pdserve.backends.cublas_capturable import CUDA_R_16BF, CUDA_R_32F, current
from pdserve.backends.cuda_launch import launch_overlapped

BF16 = np.dtype(ml_dtypes.bfloat16)
CSRC = Path(__file__).resolve().parents[2] / "csrc"
_INCLUDE = re.compile(r'^#include "([\w.]+)"[ \t]*$', re.MULTILINE)

# NaN bit patterns that poisoned outputs start as
_POISON = {2: 0x7FC0, 4: 0x7FC00000}


def to_bf16_bits(host: np.ndarray) -> np.ndarray:
    """Float host data rounded to bf16 (nearest even), as uint16 words."""
    return np.ascontiguousarray(host, dtype=np.float32).astype(BF16).view(np.uint16)


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """uint16 bf16 words -> float32, exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _source(name: str) -> str:
    """The text of csrc/`name` with its local includes inlined, so NVRTC needs no include path
    and CuPy's compile cache (keyed by the text) sees every change."""
    path = CSRC / name
    if not path.is_file():
        raise FileNotFoundError(f"CUDA source {path} is missing: the cupy backend needs csrc/")
    return _INCLUDE.sub(lambda m: _source(m.group(1)), path.read_text())


# Compile-time switches of csrc (-D NAME=value), read at each kernel's first use, so benchmarks
# can A/B them in one process (profile_decode_graph.py --set cupy_kernels.EVICT_FIRST=0).
EVICT_FIRST = 0  # weight_stream.cuh: weight loads ask L2 to evict their lines first


def _defines() -> tuple[str, ...]:
    return (f"-DPDSERVE_EVICT_FIRST={int(EVICT_FIRST)}",)


@functools.cache
def _module(name: str, defines: tuple[str, ...]) -> cp.RawModule:
    return cp.RawModule(code=_source(name), options=("--std=c++17", *defines))


@functools.cache
def _kernel(file: str, name: str, defines: tuple[str, ...]) -> cp.RawKernel:
    return _module(file, defines).get_function(name)


def compiled(file: str, name: str) -> cp.RawKernel:
    """Kernel `name` of csrc/`file`, built with the switches as they are now."""
    return _kernel(file, name, _defines())


def _arg(v: object) -> object:
    """Python ints and floats as the kernels' `int` and `float` (CuPy would pass 64 bits)."""
    if isinstance(v, bool):
        return np.int32(v)
    if isinstance(v, int):
        return np.int32(v)
    if isinstance(v, float):
        return np.float32(v)
    return v


@dataclass(frozen=True)
class Pending:
    """An array that `Kernels.on_side` is computing on its side stream."""

    value: cp.ndarray
    done: cp.cuda.Event

    def get(self) -> cp.ndarray:
        """The array, once the current stream has waited for the side stream's work on it."""
        cp.cuda.get_current_stream().wait_event(self.done)
        return self.value


class Kernels:
    """Launches csrc kernels and allocates their outputs. With `poison`, every new output starts
    as NaN (floats) or -1 (ints), so that a test sees any element a kernel failed to write.
    While `overlap` is set (decode graph capture), launches may overlap the kernel before them
    (backends/cuda_launch.py)."""

    def __init__(self, poison: bool = False) -> None:
        self.poison = poison
        self.overlap = False
        self.num_sms: int = cp.cuda.Device().attributes["MultiProcessorCount"]
        self._streams: dict[str, cp.cuda.Stream] = {}
        self._detached: list[cp.cuda.Event] = []

    def on_side(self, fn: Callable[..., Any], *args: object, lane: str = "side") -> Pending:
        """Queue fn(*args) on a second stream (one per `lane`), after all work queued so far on
        the current one, so that it overlaps what the current stream does next (also inside a
        CUDA-graph capture, where it becomes a parallel branch). Inputs must stay referenced
        until `Pending.get`."""
        side = self._streams.get(lane)
        if side is None:
            side = self._streams[lane] = cp.cuda.Stream(non_blocking=True)
        start = cp.cuda.Event(disable_timing=True)
        start.record(cp.cuda.get_current_stream())
        side.wait_event(start)
        with side:
            value = fn(*args)
        done = cp.cuda.Event(disable_timing=True)
        done.record(side)
        return Pending(value, done)

    def detach(self, fn: Callable[..., Any], *args: object) -> None:
        """`on_side` for work nothing waits on (prefetches): it runs on its own lane, and the
        current stream waits for it only at `join`, which a CUDA-graph capture must call before
        it ends."""
        self._detached.append(self.on_side(fn, *args, lane="detached").done)

    def join(self) -> None:
        """The current stream waits for everything `detach` queued so far."""
        stream = cp.cuda.get_current_stream()
        for done in self._detached:
            stream.wait_event(done)
        self._detached.clear()

    def empty(self, shape: tuple[int, ...], dtype: np.dtype | type) -> cp.ndarray:
        out = cp.empty(shape, dtype=dtype)
        if self.poison:
            dt = np.dtype(dtype)
            if dt.kind == "f" or dt == BF16:
                out.view(np.uint16 if dt.itemsize == 2 else np.uint32).fill(_POISON[dt.itemsize])
            else:
                out.fill(-1)
        return out

    def launch(
        self,
        file: str,
        name: str,
        grid: tuple[int, ...],
        block: int,
        args: tuple,
        shared: int = 0,
    ) -> None:
        """Run kernel `name` of csrc/`file`; ints are passed as int32, floats as float32 (pass
        np.int64 for `long long` parameters)."""
        kernel = compiled(file, name)
        if shared > 48 * 1024 and kernel.max_dynamic_shared_size_bytes < shared:
            kernel.max_dynamic_shared_size_bytes = shared
        args = tuple(map(_arg, args))
        if self.overlap:
            launch_overlapped(kernel.kernel.ptr, grid, block, args, shared)
        else:
            kernel(grid, (block,), args, shared_mem=shared)


def threads_for(n: int) -> int:
    """A block size for a row of n elements: a multiple of 32, at most 1024."""
    return min(1024, max(32, -(-n // 32) * 32))


def norm_threads(h: int) -> int:
    """The block of a kernel that normalizes rows of h (csrc/norm.cuh): every thread holds at
    most NORM_VALS (8) of them."""
    if h > 8 * 1024:
        raise ValueError(f"hidden size {h}: the cupy norms take at most 8192")
    return threads_for(-(-h // 8))


def row_major(x: cp.ndarray, dtype: np.dtype = BF16) -> cp.ndarray:
    """`x` as `dtype`, C-contiguous and 16-byte aligned (what the kernels' wide loads need)."""
    if x.dtype != dtype:
        x = x.astype(dtype)
    if not x.flags.c_contiguous or x.data.ptr % 16:
        x = x.copy()  # a fresh allocation: contiguous and aligned
    return x


def row_major_float(x: cp.ndarray) -> cp.ndarray:
    """`row_major` for the kernels that read either float32 or bf16 (the residual stream): a
    float32 `x` stays float32, anything else becomes bf16."""
    return row_major(x, x.dtype if x.dtype == np.float32 else BF16)


def gemm(k: Kernels, x: cp.ndarray, w: cp.ndarray, out_dtype: np.dtype) -> cp.ndarray:
    """x [M, K] bf16 (unit column stride) times w [N, K] bf16, transposed: [M, N] in
    `out_dtype` (bf16 or float32), float32 accumulation through cublasGemmEx (capturable)."""
    m, kdim = x.shape
    if x.dtype != BF16 or x.strides[1] != 2 or x.strides[0] < 2 * kdim or x.strides[0] % 2:
        x = row_major(x)
    n = w.shape[0]
    out = k.empty((m, n), out_dtype)
    out_type = CUDA_R_32F if np.dtype(out_dtype) == np.float32 else CUDA_R_16BF
    current().gemm_nt(m, n, kdim, x.data.ptr, x.strides[0] // 2, w.data.ptr,
                                    w.strides[0] // 2, out.data.ptr, n, out_type)  # fmt: skip
    return out
