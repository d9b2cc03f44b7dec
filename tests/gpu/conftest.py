"""Fixtures of the GPU tests. CuPy is imported only when a test asks for `ops`, so CI (no GPU)
can collect this folder and skip its modules."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest


@pytest.fixture
def ops() -> Any:
    """A cupy backend whose every new output starts as NaN (or -1), to catch unwritten
    elements."""
    from pdserve.backends.cupy_ops import CupyOps

    return CupyOps(poison=True)


@pytest.fixture
def rng() -> np.random.Generator:
    """Fresh data every run; the seed is printed, so a failure can be replayed."""
    seed = int(np.random.SeedSequence().entropy) % 2**63
    print(f"seed {seed}")
    return np.random.default_rng(seed)
