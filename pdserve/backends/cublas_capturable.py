"""cuBLAS GEMMs that a CUDA graph can capture, called through ctypes.

CuPy's own cuBLAS bindings cannot be captured (DESIGN.md 5a), but cuBLAS itself can, provided the
handle is bound to the capturing stream and owns a fixed workspace (so it allocates nothing while
capturing). This module opens the libcublas CuPy already loaded and keeps one handle per stream,
bound to it once and given its own workspace: never rebinding matters, because cublasSetStream
resets the workspace, and one workspace per stream is what lets streams run GEMMs concurrently.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from pathlib import Path

import cupy as cp
from cupy_backends.cuda.libs import cublas  # noqa: F401  (loads CuPy's libcublas)

CUDA_R_32F, CUDA_R_16BF = 0, 14  # cudaDataType_t (library_types.h)
_OP_N, _OP_T = 0, 1
_COMPUTE_32F = 68  # CUBLAS_COMPUTE_32F
_GEMM_DEFAULT = -1
_POINTER_MODE_HOST = 0
WORKSPACE_BYTES = 32 << 20  # what cuBLAS asks for Hopper GEMMs, with room to spare


def _library_path() -> str:
    """The libcublas this process already mapped (CuPy's), else the system's."""
    maps = Path("/proc/self/maps")
    if maps.exists():
        for line in maps.read_text().splitlines():
            path = line.split()[-1]
            if "/libcublas.so" in path:
                return path
    found = ctypes.util.find_library("cublas")
    if found is None:
        raise OSError("libcublas is not loaded and not found on the library path")
    return found


@functools.cache
def _lib() -> ctypes.CDLL:
    lib = ctypes.CDLL(_library_path())
    lib.cublasCreate_v2.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
    lib.cublasSetStream_v2.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.cublasSetWorkspace_v2.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    lib.cublasSetPointerMode_v2.argtypes = [ctypes.c_void_p, ctypes.c_int]
    i, p = ctypes.c_int, ctypes.c_void_p
    lib.cublasGemmEx.argtypes = [p, i, i, i, i, i, p, p, i, i, p, i, i, p, p, i, i, i, i]
    ll = ctypes.c_longlong
    lib.cublasGemmStridedBatchedEx.argtypes = [p, i, i, i, i, i, p, p, i, i, ll, p, i, i, ll, p,
                                               p, i, i, ll, i, i, i]  # fmt: skip
    lib.cublasGemmBatchedEx.argtypes = [p, i, i, i, i, i, p, p, i, i, p, i, i, p, p, i, i, i, i, i]
    return lib


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"cuBLAS {what} failed with status {status}")


class Cublas:
    """A cuBLAS handle bound to one stream (of the current device), with its own workspace."""

    def __init__(self, stream: int) -> None:
        lib = _lib()
        handle = ctypes.c_void_p()
        _check(lib.cublasCreate_v2(ctypes.byref(handle)), "cublasCreate")
        self._lib, self._handle = lib, handle
        _check(lib.cublasSetStream_v2(handle, stream), "cublasSetStream")
        self._workspace = cp.cuda.Memory(WORKSPACE_BYTES)  # outside any pool: lives as long
        _check(lib.cublasSetWorkspace_v2(handle, self._workspace.ptr, WORKSPACE_BYTES), "workspace")
        _check(lib.cublasSetPointerMode_v2(handle, _POINTER_MODE_HOST), "pointer mode")
        self._one = ctypes.c_float(1.0)
        self._zero = ctypes.c_float(0.0)

    def gemm_nt(
        self, m: int, n: int, k: int, x_ptr: int, ldx: int, w_ptr: int, ldw: int,
        out_ptr: int, ldo: int, out_type: int, accumulate: bool = False,
        in_type: int = CUDA_R_16BF,
    ) -> None:  # fmt: skip
        """Row-major out[m, n] (+)= x[m, k] @ w[n, k]^T, x and w of `in_type` (bf16, or float32
        for a true float32 GEMM: CUBLAS_COMPUTE_32F never rounds to tf32), float32 accumulation;
        ld* are row strides in elements. In cuBLAS' column-major terms: out^T = w @ x^T."""
        beta = self._one if accumulate else self._zero
        status = self._lib.cublasGemmEx(
            self._handle, _OP_T, _OP_N, n, m, k,
            ctypes.byref(self._one), w_ptr, in_type, ldw,
            x_ptr, in_type, ldx,
            ctypes.byref(beta), out_ptr, out_type, ldo,
            _COMPUTE_32F, _GEMM_DEFAULT,
        )  # fmt: skip
        _check(status, f"cublasGemmEx ({m}x{n}x{k})")

    def gemm_batched_nt(
        self, batch: int, m: int, n: int, k: int, x_ptr: int, ldx: int, x_stride: int,
        w_ptr: int, ldw: int, w_stride: int, out_ptr: int, ldo: int, out_stride: int,
        out_type: int,
    ) -> None:  # fmt: skip
        """For b < batch: row-major out_b[m, n] = x_b[m, k] @ w_b[n, k]^T, where operand b sits
        b * stride elements after the first (cublasGemmStridedBatchedEx)."""
        status = self._lib.cublasGemmStridedBatchedEx(
            self._handle, _OP_T, _OP_N, n, m, k, ctypes.byref(self._one),
            w_ptr, CUDA_R_16BF, ldw, w_stride, x_ptr, CUDA_R_16BF, ldx, x_stride,
            ctypes.byref(self._zero), out_ptr, out_type, ldo, out_stride, batch,
            _COMPUTE_32F, _GEMM_DEFAULT,
        )  # fmt: skip
        _check(status, f"cublasGemmStridedBatchedEx ({batch} x {m}x{n}x{k})")

    def gemm_pointers_nt(
        self, batch: int, m: int, n: int, k: int, x_ptrs: int, ldx: int, w_ptrs: int, ldw: int,
        out_ptrs: int, ldo: int, out_type: int,
    ) -> None:  # fmt: skip
        """For b < batch: row-major out_b[m, n] = x_b[m, k] @ w_b[n, k]^T, bf16 operands, one
        call (cublasGemmBatchedEx); the *_ptrs are device addresses of device arrays of `batch`
        uint64 addresses. Every entry has the same shape, so cuBLAS runs one kernel over all."""
        status = self._lib.cublasGemmBatchedEx(
            self._handle, _OP_T, _OP_N, n, m, k, ctypes.byref(self._one),
            w_ptrs, CUDA_R_16BF, ldw, x_ptrs, CUDA_R_16BF, ldx,
            ctypes.byref(self._zero), out_ptrs, out_type, ldo, batch, _COMPUTE_32F, _GEMM_DEFAULT,
        )  # fmt: skip
        _check(status, f"cublasGemmBatchedEx ({batch} x {m}x{n}x{k})")


_handles: dict[tuple[int, int], Cublas] = {}


def current() -> Cublas:
    """The handle of the current stream (made on first use, which must not be inside a
    capture: capture a stream only after running the same work on it eagerly)."""
    stream = cp.cuda.get_current_stream().ptr  # 0: the legacy default stream of the device
    key = (cp.cuda.runtime.getDevice(), stream)
    blas = _handles.get(key)
    if blas is None:
        blas = _handles[key] = Cublas(stream)
    return blas
