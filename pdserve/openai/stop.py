"""Stop strings on streamed text: cut at the first match, hold back what could start one."""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    """Feeds a choice's text through its stop strings as it is generated.

    `feed` returns the text that is safe to send: text that can no longer be part of a stop
    string. A suffix that is a proper prefix of some stop string is held back until the next
    text decides it. A match ends the output, at the start of the stop string (or after it, with
    `include_stop_str`). Among matches, the one that ends first wins, then the one that starts
    first: the result is what a character-by-character stream would give, however the text was
    split into tokens.
    """

    def __init__(self, stops: Sequence[str], include_stop_str: bool = False) -> None:
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        self.stops = tuple(dict.fromkeys(stops))
        self.include_stop_str = include_stop_str
        self.matched: str | None = None  # the stop string that ended the output
        self._held = ""

    @property
    def held(self) -> str:
        """Text received but not yet released, because it could start a stop string."""
        return self._held

    def feed(self, text: str) -> str:
        """Take newly generated text; return the text that can be sent now.

        After a match returns the text up to it and sets `matched`; later calls return "".
        """
        if self.matched is not None:
            return ""
        buf = self._held + text
        # Released text never holds a possible stop start, so every match begins in `buf`.
        best: tuple[int, int, str] | None = None
        for stop in self.stops:
            start = buf.find(stop)
            if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
                best = (start + len(stop), start, stop)
        if best is not None:
            end, start, self.matched = best
            self._held = ""
            return buf[: end if self.include_stop_str else start]
        keep = self._partial_suffix(buf)
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """The held text, once generation ended without completing a stop string."""
        held, self._held = self._held, ""
        return held if self.matched is None else ""

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buf)), longest, -1):
                if buf.endswith(stop[:n]):
                    longest = n
                    break
        return longest
