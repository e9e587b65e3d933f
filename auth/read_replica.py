"""Reports from a Postgres streaming replica (``MODELGATE_DATABASE_READ_URL``).

The reports (``/me/usage``, ``/admin/usage``, the billing export of a closed month, the audit
listing) may read a hot standby; everything else (the credential check, quotas, usage writes,
whatever must see its own write) stays on the primary. Before each report the replica is asked,
on the session the report then uses, how far behind the primary it is
(:data:`REPLICA_LAG_SQL`); the answer goes to the client (the ``Replica-Lag`` header). The
report reads the primary instead when the replica is further behind than
``MODELGATE_DATABASE_READ_MAX_LAG_SECONDS``, or does not answer within
:data:`CHECK_TIMEOUT_SECONDS` (then it is not asked again for :data:`RETRY_SECONDS`, so that a
replica that hangs costs one timeout per process that often, not one per report).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Literal

import structlog
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from auth.db import create_sessionmaker

logger = structlog.get_logger(__name__)

# How far behind the primary the server answering is, in seconds. 0 when it is no standby at all
# (a primary, or a proxy in front of one), and when it has replayed everything it received and is
# still streaming from the primary: the time of the last replayed commit says nothing then, the
# primary may simply have had nothing to commit since. (Replayed at or past what was received:
# a restarted standby reports as received only what it has streamed since, from the start of a
# WAL segment, which can be behind what it replayed from its own disk.) Otherwise (still
# replaying, or cut off from the primary), the age of the last replayed commit; NULL (never
# replayed one) is infinite.
# pg_stat_wal_receiver's status is visible to a role with pg_read_all_stats (or pg_monitor);
# without it an idle replica reads as lagging and the reports go to the primary.
REPLICA_LAG_SQL = text(
    """
    SELECT CASE
        WHEN NOT pg_is_in_recovery() THEN 0.0
        WHEN pg_last_wal_replay_lsn() >= pg_last_wal_receive_lsn()
            AND EXISTS (SELECT 1 FROM pg_stat_wal_receiver WHERE status = 'streaming')
            THEN 0.0
        ELSE COALESCE(
            EXTRACT(EPOCH FROM clock_timestamp() - pg_last_xact_replay_timestamp())::float8,
            'Infinity'::float8
        )
    END
    """
)
# How long a report waits for the replica's connection and lag before it reads the primary.
CHECK_TIMEOUT_SECONDS = 1.0
# After the replica failed to answer, how long the reports read the primary without asking it.
RETRY_SECONDS = 5.0

ReadSource = Literal["replica", "primary"]


class ReadReplica:
    """The replica's engine, and the choice, report by report, of replica or primary."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        max_lag_seconds: float,
        retry_seconds: float = RETRY_SECONDS,
        observer: Callable[[ReadSource, float | None], None] | None = None,
    ) -> None:
        self.engine = engine
        self.max_lag_seconds = max_lag_seconds
        self.retry_seconds = retry_seconds
        self._sessionmaker = create_sessionmaker(engine)
        self._observer = observer
        self._retry_at = float("-inf")

    async def open(self) -> tuple[AsyncSession, float] | None:
        """A session on the replica and the replica's lag in seconds, or None when the report
        must read the primary (the replica down, slow to answer, or too far behind). The caller
        closes the session."""
        if time.monotonic() < self._retry_at:
            self._observe("primary", None)
            return None
        session = self._sessionmaker()
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_SECONDS):
                # At least 0: the standby's clock may be a little behind the primary's.
                lag = max(0.0, float((await session.execute(REPLICA_LAG_SQL)).scalar_one()))
        except (TimeoutError, DBAPIError, OSError) as exc:
            await session.close()
            self._retry_at = time.monotonic() + self.retry_seconds
            logger.warning(
                "the read replica did not answer: reports read the primary",
                error=type(exc).__name__,
                retry_in_seconds=self.retry_seconds,
            )
            self._observe("primary", None)
            return None
        except BaseException:
            await session.close()
            raise
        if lag > self.max_lag_seconds:
            await session.close()
            self._observe("primary", lag)
            return None
        self._observe("replica", lag)
        return session, lag

    def _observe(self, source: ReadSource, lag: float | None) -> None:
        if self._observer is not None:
            self._observer(source, lag)

    async def close(self) -> None:
        """Close the replica's connections."""
        await self.engine.dispose()
