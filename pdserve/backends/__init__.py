"""Compute backends: `numpy` (CPU, float32, the reference) and `cupy` (one NVIDIA GPU)."""

from __future__ import annotations

from pdserve.backends.base import Ops

BACKENDS = ("numpy", "cupy", "auto")


def gpu_unavailable_reason() -> str | None:
    """Why the cupy backend cannot run here (CuPy missing, no GPU visible), or None if it can."""
    try:
        import cupy
        import ml_dtypes  # noqa: F401  (CuPy's bfloat16 dtype)
    except ImportError as e:
        return f"CuPy is not installed ({e}); install pdserve[cuda]"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver, or a driver without devices
        return f"no CUDA GPU is visible ({e})"
    return None if count > 0 else "no CUDA GPU is visible"


def get_ops(name: str = "auto") -> Ops:
    """The ops of backend `name`. `auto` is numpy for now: the cupy backend is chosen explicitly
    until nodes move KV between GPU pools (CUDA IPC) and quantized weights run on it."""
    if name not in BACKENDS:
        raise ValueError(f"--backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if name == "cupy":
        reason = gpu_unavailable_reason()
        if reason is not None:
            raise ValueError(f"--backend cupy: {reason}; use --backend numpy")
        from pdserve.backends.cupy_ops import CupyOps

        return CupyOps()
    from pdserve.backends.numpy_ops import NumpyOps

    return NumpyOps()
