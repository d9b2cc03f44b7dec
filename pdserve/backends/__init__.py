"""Compute backends: `numpy` (CPU, float32, the reference) and, later, `cupy` (GPU)."""

from __future__ import annotations

from pdserve.backends.base import Ops

BACKENDS = ("numpy", "cupy", "auto")


def get_ops(name: str = "auto") -> Ops:
    """The ops of backend `name`; `auto` picks cupy when a GPU backend exists, else numpy."""
    if name not in BACKENDS:
        raise ValueError(f"--backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if name == "cupy":
        raise ValueError("--backend cupy: the GPU backend is not built yet; use --backend numpy")
    from pdserve.backends.numpy_ops import NumpyOps

    return NumpyOps()
