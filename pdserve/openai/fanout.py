"""Merging the engine streams of a request's choices into one stream of (choice, delta)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence

from pdserve.openai.engine_protocol import TokenDelta

logger = logging.getLogger(__name__)


async def _next(stream: AsyncIterator[TokenDelta]) -> TokenDelta | None:
    """The stream's next delta, or None once it is exhausted."""
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None


class Fanout:
    """Reads several engine streams at once, yielding deltas as they arrive.

    Each open stream has at most one read in flight. A stream leaves when it is exhausted or
    when `close(i)` closes it early (which aborts its engine request); `aclose()` cancels every
    read in flight and closes every stream left, and must run however the request ends.
    """

    def __init__(
        self,
        streams: Sequence[AsyncIterator[TokenDelta]],
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self._streams = dict(enumerate(streams))
        self._reads: dict[asyncio.Task[TokenDelta | None], int] = {}
        self._on_close = on_close
        for i in self._streams:
            self._read(i)

    def _read(self, i: int) -> None:
        self._reads[asyncio.create_task(_next(self._streams[i]))] = i

    async def prime(self) -> None:
        """Wait until every stream has produced its first delta (or ended).

        Admission errors (a rejected prompt, a dead engine) surface here, raised, before the
        caller commits to a streaming response.
        """
        if not self._reads:
            return
        await asyncio.wait(self._reads)
        for task in sorted(self._reads, key=self._reads.__getitem__):
            exc = task.exception()
            if exc is not None:
                raise exc

    async def events(self) -> AsyncIterator[tuple[int, TokenDelta]]:
        """Yield (stream index, delta) until every stream is exhausted or closed."""
        while self._reads:
            done, _ = await asyncio.wait(self._reads, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=self._reads.__getitem__):
                i = self._reads.pop(task, None)
                if i is None:  # closed by the consumer while this batch was being yielded
                    continue
                delta = task.result()
                if delta is None:
                    del self._streams[i]
                    continue
                yield i, delta
                if i in self._streams:  # the consumer did not close it meanwhile
                    self._read(i)

    async def close(self, i: int) -> None:
        """Close stream i now (its engine request is aborted); no more deltas come from it."""
        stream = self._streams.pop(i, None)
        for task, j in list(self._reads.items()):
            if j == i:
                del self._reads[task]
                await _cancel(task)
        if stream is not None:
            await aclose_streams([stream])

    async def aclose(self) -> None:
        """Cancel reads in flight and close every open stream; safe to call more than once."""
        reads, self._reads = list(self._reads), {}
        streams, self._streams = list(self._streams.values()), {}
        for task in reads:
            task.cancel()
        try:
            if reads:  # let cancelled reads finish before closing their streams
                await asyncio.gather(*reads, return_exceptions=True)
        finally:
            await aclose_streams(streams)
            if self._on_close is not None:
                on_close, self._on_close = self._on_close, None
                on_close()


async def _cancel(task: asyncio.Task[TokenDelta | None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def aclose_streams(streams: Sequence[AsyncIterator[TokenDelta]]) -> None:
    """Close engine streams (aborting their requests if still running), one after another."""
    for stream in streams:
        aclose = getattr(stream, "aclose", None)
        if aclose is None:
            continue
        try:
            await aclose()
        except Exception:  # the request is going away either way
            logger.warning("closing an engine stream failed", exc_info=True)
