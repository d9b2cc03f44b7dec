"""Fault injection for the KV sender, for tests only: off unless PDSERVE_KV_FAULT is set.

`PDSERVE_KV_FAULT="drop=0.05,corrupt=0.05,seed=1"` drops 5% of layer frames and flips one byte
of another 5%. A dropped frame must then fail the receiver's completeness check at KVDone, a
corrupted one its checksum (so tests of corruption enable checksums).
"""

from __future__ import annotations

import logging
import os
import random

import numpy as np

log = logging.getLogger(__name__)

ENV = "PDSERVE_KV_FAULT"


class FaultInjector:
    """Decides, per layer frame, whether to send it intact, drop it, or corrupt it."""

    def __init__(self, drop: float = 0.0, corrupt: float = 0.0, seed: int = 0) -> None:
        for key, rate in (("drop", drop), ("corrupt", corrupt)):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{ENV}: {key} must be in [0, 1], got {rate}")
        if drop + corrupt > 1.0:
            raise ValueError(f"{ENV}: drop + corrupt must be at most 1, got {drop + corrupt}")
        self.drop_rate = drop
        self.corrupt_rate = corrupt
        self._rng = random.Random(seed)
        self.dropped = 0  # layer frames, cumulative
        self.corrupted = 0  # layer frames, cumulative

    @classmethod
    def from_env(cls) -> FaultInjector | None:
        """The injector PDSERVE_KV_FAULT describes, or None when it is unset or empty."""
        spec = os.environ.get(ENV, "").strip()
        if not spec:
            return None
        kwargs: dict[str, float | int] = {}
        for item in spec.split(","):
            key, sep, value = item.strip().partition("=")
            if not sep or key not in ("drop", "corrupt", "seed") or key in kwargs:
                raise ValueError(f"{ENV}: expected drop=P,corrupt=P,seed=N, got {spec!r}")
            try:
                kwargs[key] = int(value) if key == "seed" else float(value)
            except ValueError:
                raise ValueError(f"{ENV}: {key}={value!r} is not a number") from None
        injector = cls(**kwargs)  # type: ignore[arg-type]
        log.warning(
            "KV fault injection on: drop=%s corrupt=%s", injector.drop_rate, injector.corrupt_rate
        )
        return injector

    def next(self) -> str:
        """The fate of the next layer frame: "send", "drop" or "corrupt"."""
        r = self._rng.random()
        if r < self.drop_rate:
            self.dropped += 1
            return "drop"
        if r < self.drop_rate + self.corrupt_rate:
            self.corrupted += 1
            return "corrupt"
        return "send"

    def flip_byte(self, buf: np.ndarray) -> None:
        """Flip every bit of one byte of `buf` (C-contiguous, written in place)."""
        flat = buf.reshape(-1).view(np.uint8)
        if flat.size:
            flat[self._rng.randrange(flat.size)] ^= 0xFF
