"""``verify_chain`` (``modelgate audit verify``, GET /admin/audit/verify) on a live trail: events
that concurrent writers append while it walks the chain are not taken for a tampered end."""

from __future__ import annotations

import asyncio

from auth.audit import record_event, verify_chain
from tests.conftest import TEST_ACTOR, Harness


async def _append(harness: Harness, count: int) -> None:
    async with harness.sessionmaker() as session:
        for i in range(count):
            await record_event(
                session, TEST_ACTOR, action="test.append", target_type="x", target_id=str(i)
            )
        await session.commit()


async def test_events_appended_during_a_walk_do_not_break_it(harness: Harness) -> None:
    await _append(harness, 300)
    stop = asyncio.Event()

    async def writer() -> int:
        written = 0
        while not stop.is_set():
            await _append(harness, 1)
            written += 1
            await asyncio.sleep(0.001)
        return written

    appending = asyncio.create_task(writer())
    try:
        reports = []
        for _ in range(3):
            async with harness.sessionmaker() as session:
                # Small batches: a walk long enough for writers to commit during it.
                reports.append(await verify_chain(session, batch=5))
    finally:
        stop.set()
        written = await appending
    assert written > 0
    assert [r.problem for r in reports] == [None, None, None]
    async with harness.sessionmaker() as session:
        final = await verify_chain(session)
    assert final.intact, final.problem
    assert final.events >= 300 + written
