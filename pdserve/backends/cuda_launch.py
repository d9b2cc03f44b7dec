"""Kernel launches that may overlap the previous kernel (programmatic dependent launch, sm_90):
cuLaunchKernelEx through ctypes on the driver CuPy already loaded.

A kernel launched this way may be scheduled while the kernel before it in the stream still runs;
csrc kernels call `pdl_start()` (common.cuh) first, which waits for that kernel's writes and
then lets the next one launch. Decode graphs capture every csrc launch this way, so each
kernel's launch latency and block scheduling hide behind the one before it; cuBLAS and CuPy's
own kernels in between keep plain stream order.
"""

from __future__ import annotations

import ctypes
import functools

import cupy as cp
import numpy as np

_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CUlaunchAttributeID


class _AttrValue(ctypes.Union):
    _fields_ = [("pad", ctypes.c_char * 64), ("flag", ctypes.c_uint)]


class _Attr(ctypes.Structure):  # CUlaunchAttribute
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", _AttrValue)]


class _Config(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [
        ("grid", ctypes.c_uint * 3),
        ("block", ctypes.c_uint * 3),
        ("shared", ctypes.c_uint),
        ("stream", ctypes.c_void_p),
        ("attrs", ctypes.POINTER(_Attr)),
        ("num_attrs", ctypes.c_uint),
    ]


_SCALARS = {
    np.dtype(np.int32): ctypes.c_int32,
    np.dtype(np.int64): ctypes.c_int64,
    np.dtype(np.uint64): ctypes.c_uint64,
    np.dtype(np.float32): ctypes.c_float,
}


@functools.cache
def _driver() -> ctypes.CDLL:
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuLaunchKernelEx.argtypes = [ctypes.POINTER(_Config), ctypes.c_void_p,
                                     ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]  # fmt: skip
    return lib


def _param(v: object) -> ctypes._SimpleCData:
    if isinstance(v, cp.ndarray):
        return ctypes.c_void_p(v.data.ptr)
    if isinstance(v, np.generic) and v.dtype in _SCALARS:
        return _SCALARS[v.dtype](v.item())
    raise TypeError(f"kernel argument of type {type(v).__name__}: pass arrays or NumPy scalars")


def launch_overlapped(
    function_ptr: int, grid: tuple[int, ...], block: int, args: tuple, shared: int
) -> None:
    """Launch the CUfunction `function_ptr` on the current stream, allowed to overlap the kernel
    before it. `args`: device arrays and NumPy scalars matching the kernel's parameters."""
    params = [_param(a) for a in args]  # kept alive through the call
    ptrs = (ctypes.c_void_p * len(params))(*(ctypes.addressof(p) for p in params))
    attr = _Attr(id=_PROGRAMMATIC_STREAM_SERIALIZATION)
    attr.value.flag = 1
    dims = (*grid, 1, 1)[:3]
    config = _Config(
        grid=(ctypes.c_uint * 3)(*dims), block=(ctypes.c_uint * 3)(block, 1, 1), shared=shared,
        stream=cp.cuda.get_current_stream().ptr, attrs=ctypes.pointer(attr), num_attrs=1,
    )  # fmt: skip
    status = _driver().cuLaunchKernelEx(ctypes.byref(config), function_ptr, ptrs, None)
    if status != 0:
        raise RuntimeError(f"cuLaunchKernelEx failed with CUresult {status}")
