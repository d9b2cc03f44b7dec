"""The CPU tier of the prefix cache (`--swap-space`): evicted prefix blocks wait here, LRU.

Plain bookkeeping of slot ids in a host KV pool; the model runner does the copies the block
manager records.
"""

from __future__ import annotations

from collections import OrderedDict, deque


class HostTier:
    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.free: deque[int] = deque(range(num_slots))
        self.entries: OrderedDict[bytes, int] = OrderedDict()  # block hash -> slot, oldest first

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self.entries

    def store(self, block_hash: bytes) -> int | None:
        """A slot to copy an evicted block into, evicting the oldest entry if full; None if the
        hash is already here (or the tier has no slots)."""
        if block_hash in self.entries:
            self.entries.move_to_end(block_hash)
            return None
        if self.free:
            slot = self.free.popleft()
        elif self.entries:
            _, slot = self.entries.popitem(last=False)
        else:
            return None
        self.entries[block_hash] = slot
        return slot

    def take(self, block_hash: bytes) -> int:
        """Remove an entry; its slot belongs to the caller until `release`d."""
        return self.entries.pop(block_hash)

    def release(self, slot: int) -> None:
        self.free.append(slot)

    def check_integrity(self) -> None:
        slots = list(self.free) + list(self.entries.values())
        assert sorted(slots) == list(range(self.num_slots)), "host slots lost or doubled"
