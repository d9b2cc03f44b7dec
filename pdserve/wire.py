"""The one codec of pdserve's ZeroMQ messages: typed pydantic models over msgpack.

On the wire a message is one msgpack frame: a map with `type`, the schema version `v` and the
message's fields (raw array payloads, where a message has one, travel in further frames).
Decoding bounds the size and checks the version, the type and every field strictly, so a
malformed or foreign message is rejected, never half-applied. Nothing is ever unpickled.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar, Generic, TypeVar

import msgpack
from pydantic import BaseModel, ConfigDict, ValidationError


class WireMessage(BaseModel):
    """A message type: strict fields, no extras, immutable. Subclasses set TYPE."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)
    TYPE: ClassVar[str] = ""


M = TypeVar("M", bound=WireMessage)


class Codec(Generic[M]):
    def __init__(
        self, types: Iterable[type[M]], version: int, max_bytes: int, error: type[ValueError],
        what: str = "message",
    ) -> None:  # fmt: skip
        self.types = {cls.TYPE: cls for cls in types}
        self.version = version
        self.max_bytes = max_bytes
        self.error = error
        self.what = what

    def encode(self, msg: M) -> bytes:
        return msgpack.packb({"type": msg.TYPE, "v": self.version, **msg.model_dump()})

    def decode(self, frame: bytes | memoryview) -> M:
        """Parse and validate one frame; `error` says what is wrong with it."""
        if len(frame) > self.max_bytes:
            raise self.error(f"{self.what} of {len(frame)} bytes exceeds {self.max_bytes}")
        try:
            raw = msgpack.unpackb(frame, raw=False, strict_map_key=True, use_list=True)
        except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
                msgpack.StackError) as e:  # fmt: skip
            raise self.error(f"not msgpack: {type(e).__name__}") from None
        if not isinstance(raw, dict):
            raise self.error(f"{self.what} is a {type(raw).__name__}, not a map")
        kind, version = raw.pop("type", None), raw.pop("v", None)
        if type(version) is not int or version != self.version:
            raise self.error(f"schema version {version!r}, expected {self.version}")
        cls = self.types.get(kind) if isinstance(kind, str) else None
        if cls is None:
            raise self.error(f"unknown {self.what} type {kind!r:.64}")
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            err = e.errors()[0]
            raise self.error(f"invalid {kind} {self.what}: {err['msg']} at {err['loc']}") from None
