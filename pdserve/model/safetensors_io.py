"""Memory-mapped reading of safetensors checkpoints, sharded or not.

safetensors' own NumPy binding refuses bfloat16, the dtype of every ERNIE-4.5 checkpoint, so the
header is parsed here (8-byte little-endian length, JSON table of tensors, raw data) and tensors
are views into one read-only memory map per file. Every offset is checked against the file size,
so a truncated download is reported with the tensor and file it breaks.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_MAX_HEADER_BYTES = 100 * 1024 * 1024
# BF16 is read as its 16 raw bits and widened to float32 by the caller of `to_float32`.
_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the tensor and the file."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    file: Path
    dtype: str  # safetensors dtype code, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # byte offsets into the file
    end: int


class SafetensorsFile:
    """One .safetensors file: its tensor table and a lazily created read-only memory map."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, TensorEntry] = {}
        self._map: np.memmap | None = None
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(
                    f"{path}: truncated file ({size} bytes), no safetensors header"
                )
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(
                    f"{path}: header claims {n} bytes but the file has {size}; truncated or not "
                    "a safetensors file"
                )
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from None
        data_start = 8 + n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            entry = self._entry(name, info, data_start)
            if entry.end > size:
                raise CheckpointError(
                    f"{path}: tensor {name!r} needs bytes up to {entry.end} but the file has only "
                    f"{size}; the file is truncated"
                )
            self.entries[name] = entry

    def _entry(self, name: str, info: dict, data_start: int) -> TensorEntry:
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{self.path}: malformed header entry for {name!r}") from None
        if dtype not in _DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[dtype]).itemsize
        if end - begin != nbytes or begin < 0:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} of shape {list(shape)} {dtype} should span "
                f"{nbytes} bytes, header says {end - begin}"
            )
        return TensorEntry(name, self.path, dtype, shape, data_start + begin, data_start + end)

    def read(self, name: str) -> np.ndarray:
        """A read-only view of the tensor's raw data (BF16 as uint16 bits)."""
        e = self.entries[name]
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._map[e.begin : e.end]
        return raw.view(_DTYPES[e.dtype]).reshape(e.shape)


class Checkpoint:
    """All tensors of a model directory: `model.safetensors`, or shards named by an index file."""

    def __init__(self, model_dir: str | Path) -> None:
        model_dir = Path(model_dir)
        index = model_dir / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: unreadable index ({e!r})") from None
            names = sorted(set(weight_map.values()))
        else:
            names = sorted(p.name for p in model_dir.glob("*.safetensors"))
            weight_map = None
        if not names:
            raise CheckpointError(f"{model_dir}: no *.safetensors files found")
        self.files: dict[str, SafetensorsFile] = {}
        for fname in names:
            path = model_dir / fname
            if not path.exists():
                raise CheckpointError(f"{index}: names shard {fname} which does not exist")
            self.files[fname] = SafetensorsFile(path)
        self._where: dict[str, SafetensorsFile] = {}
        for f in self.files.values():
            for name in f.entries:
                if name in self._where:
                    raise CheckpointError(
                        f"tensor {name!r} appears in both {self._where[name].path} and {f.path}"
                    )
                self._where[name] = f
        if weight_map is not None:
            for name, fname in weight_map.items():
                if name not in self._where:
                    raise CheckpointError(f"{index}: lists tensor {name!r} in {fname}, not there")

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def entry(self, name: str) -> TensorEntry:
        return self._where[name].entries[name]

    def read_float32(self, name: str) -> np.ndarray:
        """The tensor widened to a new float32 array (BF16 and F16 included)."""
        e = self.entry(name)
        raw = self._where[name].read(name)
        if e.dtype == "BF16":
            return (raw.astype(np.uint32) << 16).view(np.float32)
        if e.dtype not in ("F32", "F16", "F64"):
            raise CheckpointError(
                f"{e.file}: tensor {name!r} is {e.dtype}; only float checkpoints (BF16, F16, "
                "F32) are supported"
            )
        return np.array(raw, dtype=np.float32)
