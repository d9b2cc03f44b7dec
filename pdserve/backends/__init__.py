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


def resolve_backend(name: str = "auto", tensor_parallel_size: int = 1) -> str:
    """The backend `name` stands for: `auto` is cupy when a GPU is visible and the node has one
    rank (the cupy backend has no all-reduce between GPUs yet), numpy otherwise."""
    if name not in BACKENDS:
        raise ValueError(f"--backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if name != "auto":
        return name
    return "cupy" if tensor_parallel_size == 1 and gpu_unavailable_reason() is None else "numpy"


def get_ops(name: str = "auto", tensor_parallel_size: int = 1) -> Ops:
    """The ops of backend `name` (see `resolve_backend` for `auto`)."""
    name = resolve_backend(name, tensor_parallel_size)
    if name == "cupy":
        reason = gpu_unavailable_reason()
        if reason is not None:
            raise ValueError(f"--backend cupy: {reason}; use --backend numpy")
        from pdserve.backends.cupy_ops import CupyOps

        return CupyOps()
    from pdserve.backends.numpy_ops import NumpyOps

    return NumpyOps()
