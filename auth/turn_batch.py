"""Calls gathered per event-loop turn: the requests that reach one call together (a rate-limit
check, an Idempotency-Key lookup) share one round trip to Redis or the database.

What a request would otherwise pay is the client's per-call work (a pool checkout, a round trip,
the driver's overhead), not the server's: paid once for everything that arrived together, it is
divided by the concurrency. A caller that goes away (cancelled) leaves the batch unharmed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

Item = TypeVar("Item")
Reply = TypeVar("Reply")


class TurnBatch(Generic[Item, Reply]):
    """Sends the items of the calls made in one event-loop turn in one ``send``, which answers
    each item in order (an exception in the list fails that call alone; one raised fails them
    all)."""

    def __init__(self, send: Callable[[list[Item]], Awaitable[list[Reply | BaseException]]]):
        self._send = send
        self._pending: list[tuple[Item, asyncio.Future[Reply]]] = []
        self._flush_scheduled = False
        self._in_flight: set[asyncio.Task[None]] = set()

    async def call(self, item: Item) -> Reply:
        """Queue ``item`` and await its reply."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Reply] = loop.create_future()
        self._pending.append((item, future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            # call_soon runs after every callback already ready in this turn, so the calls of
            # all requests that reached this point together go out together.
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch, self._pending = self._pending, []
        task = asyncio.ensure_future(self._answer(batch))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _answer(self, batch: list[tuple[Item, asyncio.Future[Reply]]]) -> None:
        try:
            replies = await self._send([item for item, _ in batch])
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), reply in zip(batch, replies, strict=True):
            if future.done():
                continue  # the caller went away
            if isinstance(reply, BaseException):
                future.set_exception(reply)
            else:
                future.set_result(reply)
