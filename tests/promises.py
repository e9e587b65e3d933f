"""The contract's promises of time, as the tests measure them.

A revocation, a suspension, a plan or limit change reaches every worker within 1 second (the key
cache's TTL), an activation within 2. A test measures how long its change took to be seen
(``PromisedDelay``: until the last request that missed it) and reports it: the "promised delays"
section at the end of the run lists those over the promise (tests/conftest.py calls
``summarize``). It fails only past ``PROMISE_MARGIN`` times the promise, polling every
``POLL_SECONDS``: a change missed 1.03 s after it on a loaded machine is noise, a 30-second cache
is a bug.

A module of its own, not tests/conftest.py, because pytest imports that file as ``conftest``
while the tests import it as ``tests.conftest``: two modules, and two lists of running tests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

import pytest

PROMISE_MARGIN = 5.0
POLL_SECONDS = 0.05
# The name of a measurement among a test report's user_properties (which pytest-xdist's workers
# send to the controller too).
PROMISED_DELAY = "promised_delay"

_running: list[pytest.Item] = []


@contextmanager
def running(item: pytest.Item) -> Iterator[None]:
    """Measurements made in the block are ``item``'s."""
    _running.append(item)
    try:
        yield
    finally:
        _running.pop()


class PromisedDelay:
    """How long a change the contract promises within ``promised`` seconds takes to be seen,
    counted from this object's creation (made right after the change).

    The delay measured is when the last request that missed the change was sent: the promise is
    broken exactly when a request sent after it still misses the change, and polling's own
    interval (the first request to see it is sent up to a poll later) is not the product's."""

    def __init__(self, what: str, promised: float) -> None:
        self.what = what
        self.promised = promised
        self.limit = promised * PROMISE_MARGIN
        self.started = time.monotonic()
        self.missed_until = 0.0

    def elapsed(self) -> float:
        """Seconds since the change: read when a request is sent, since the promise is about the
        moment a request is checked, not when a busy machine delivers its answer."""
        return time.monotonic() - self.started

    def not_yet(self, sent: float) -> None:
        """A request sent ``sent`` seconds after the change missed it: fail past the margin."""
        self.missed_until = max(self.missed_until, sent)
        assert sent <= self.limit, (
            f"{self.what}: missed by a request sent {sent:.2f} s after the change (promised "
            f"within {self.promised:g} s; the tests allow {self.limit:g} s)"
        )

    def seen(self) -> float:
        """The change is seen now: its delay is reported at the end of the run, and returned."""
        if _running:
            measurement = {
                "what": self.what,
                "seconds": round(self.missed_until, 3),
                "promised": self.promised,
            }
            _running[-1].user_properties.append((PROMISED_DELAY, measurement))
        return self.missed_until

    async def until(
        self, check: Callable[[], Awaitable[bool]], every: float = POLL_SECONDS
    ) -> float:
        """Poll ``check`` until it is true; the delay (``seen``), or a failure past the margin.
        A test whose polls count against a rate limit polls less often (``every``)."""
        while True:
            sent = self.elapsed()
            if await check():
                return self.seen()
            self.not_yet(sent)
            await asyncio.sleep(every)

    def until_sync(self, check: Callable[[], bool], every: float = POLL_SECONDS) -> float:
        """``until`` for a test outside the event loop."""
        while True:
            sent = self.elapsed()
            if check():
                return self.seen()
            self.not_yet(sent)
            time.sleep(every)


def summarize(terminalreporter: pytest.TerminalReporter) -> None:
    """The promised delays measured in this run: how many, and those over the promise (or the
    slowest)."""
    measured = []
    for reports in terminalreporter.stats.values():
        for report in reports:
            if getattr(report, "when", None) != "call":
                continue
            for name, value in getattr(report, "user_properties", ()):
                if name == PROMISED_DELAY:
                    measured.append((value["seconds"] / value["promised"], report.nodeid, value))
    if not measured:
        return
    measured.sort(key=lambda entry: entry[0], reverse=True)
    over = [entry for entry in measured if entry[0] > 1]
    terminalreporter.section("promised delays")
    terminalreporter.write_line(
        f"{len(measured)} measured, {len(over)} over the promise (a test fails past "
        f"{PROMISE_MARGIN:g} times it); " + ("over it:" if over else "the slowest:")
    )
    for _, nodeid, value in over or measured[:1]:
        terminalreporter.write_line(
            f"  missed {value['seconds']:.3f} s after the change (promised "
            f"{value['promised']:g} s), {value['what']}: {nodeid}"
        )
