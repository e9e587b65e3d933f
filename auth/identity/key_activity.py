"""``api_key.last_used_at`` without a database write per request.

The request path only notes the time a key was last seen (:meth:`KeyActivity.touch`: one dict
assignment). A background task writes what was noted every ``interval`` seconds in one
executemany UPDATE, and once more when the app shuts down, so ``last_used_at`` lags the truth
by at most the interval (plus a flush's duration). The UPDATE only ever moves a timestamp
forward, so several workers flushing in any order leave the latest one. A failed flush is
logged and its times are kept for the next one: it never reaches a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from datetime import UTC, datetime
from typing import cast

import structlog
from sqlalchemy import Table, bindparam, or_, update
from sqlalchemy.ext.asyncio import AsyncEngine

from auth.models import ApiKey

logger = structlog.get_logger(__name__)

_table = cast(Table, ApiKey.__table__)
# Only forward: an older time (another worker's, a late flush) never overwrites a newer one.
_TOUCH = (
    update(_table)
    .where(
        _table.c.id == bindparam("key_id"),
        or_(_table.c.last_used_at.is_(None), _table.c.last_used_at < bindparam("used_at")),
    )
    .values(last_used_at=bindparam("used_at"))
)


class KeyActivity:
    """Remembers when each key was last used and writes it to the database in batches."""

    def __init__(
        self, engine: AsyncEngine, *, interval_seconds: float, timeout_seconds: float
    ) -> None:
        self._engine = engine
        self._interval = interval_seconds
        self._timeout = timeout_seconds
        # key id -> time.time() of its latest use, since the last flush.
        self._seen: dict[uuid.UUID, float] = {}
        self._task: asyncio.Task[None] | None = None
        # Flushes that failed (their times were kept for the next one): for operators and tests.
        self.failed_flushes = 0

    def touch(self, key_id: uuid.UUID) -> None:
        """Note that the key was used now (on the request path: no I/O)."""
        self._seen[key_id] = time.time()

    def start(self) -> None:
        """Start the periodic flush (in the running event loop)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="key-activity")

    async def close(self) -> None:
        """Stop the periodic flush and write what is still pending."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.flush()

    async def flush(self) -> None:
        """Write every pending time in one statement; on failure keep them for the next flush."""
        if not self._seen:
            return
        pending, self._seen = self._seen, {}
        # In key order: two workers updating overlapping keys lock the rows in the same order
        # and cannot deadlock.
        rows = [
            {"key_id": key_id, "used_at": datetime.fromtimestamp(seen, UTC)}
            for key_id, seen in sorted(pending.items())
        ]
        try:
            async with asyncio.timeout(self._timeout), self._engine.begin() as connection:
                await connection.execute(_TOUCH, rows)
        except Exception as exc:
            self.failed_flushes += 1
            # Keep the times for the next flush, unless a newer use was noted meanwhile.
            for key_id, seen in pending.items():
                if self._seen.get(key_id, 0.0) < seen:
                    self._seen[key_id] = seen
            # The driver's message may carry SQL parameters: log the class only.
            logger.warning("last_used_at flush failed", error=type(exc).__name__, keys=len(rows))
