"""How the suite runs in parallel (``make test``: pytest-xdist), a plugin loaded by
tests/conftest.py.

Work units (``unit_of``), each run whole by one worker: a test of tests/e2e/ (it starts servers
of its own) is a unit by itself, but for the modules whose tests share a server
(``SHARED_SERVER_MODULES``); every other module is one unit, so that its module fixtures (a
database and an app, tests/deploy/test_nginx.py's nginx and replicas) are set up once. pytest
9's node ids can no longer be suffixed by xdist's ``loadgroup``, so the units are told to xdist
by a scheduler of our own (``pytest_xdist_make_scheduler``).

Order. Units are handed out in collection order (``--no-loadscope-reorder``), which
``pytest_collection_modifyitems`` makes: the longest first (the fuzzing runs), then the other
units that start real servers, then the in-process modules with the timing-critical units
(below) spread among them, so that when one of those holds the machine the other workers have
in-process work to do.

Timing. A test that starts real servers and asserts what happens within a second or two of an
event (a revocation, an activation, a grace's end) must not share the machine with other
servers, or a busy moment fails it: from the point it calls ``quiet_from_here()`` (its servers
started, its tenants and keys made) to its end, it holds the run's server lock exclusively,
while every other real-server test (marked ``e2e``) holds it shared. The few whose margin is a
fraction of a second (a window's edge, bursts that must each fit in a second) run alone from
that point: they hold the run's machine lock exclusively, which every other test holds shared.
Before that point they hold both locks shared like any other test, so that the exclusive holds
(one after another: the run's critical path at its end) last only as long as the measurements.
Each lock prefers the exclusive holder (a turnstile): once a test waits for it, no new shared
holder starts.

Without xdist (``pytest tests/...``) the order and the locks are left alone."""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Generator
from pathlib import Path
from typing import IO, Any

import pytest

# Set by pytest-xdist in each worker (the run's id is the same for every worker of one run).
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID", "")

# The slowest units, first (each runs schemathesis for a minute or more against a server).
LONGEST_FIRST = ("tests/e2e/test_fuzzing.py",)

# Real-server tests whose margin is a fraction of a second ("module::function", every
# parametrization): they run while no other test does.
ALONE = frozenset(
    {
        "tests/e2e/test_multiworker_limits.py::test_limits_hold_exactly_across_two_separate_server_processes",
        "tests/e2e/test_multiworker_limits.py::test_no_burst_across_a_window_edge_over_two_processes",
    }
)
# Real-server tests whose assertions are about a second or two: they run while no other
# real-server test does.
TIMING_CRITICAL = ALONE | frozenset(
    {
        "tests/deploy/test_nginx.py::test_a_revocation_through_nginx_holds_on_both_replicas_within_a_second",
        "tests/e2e/test_key_cache_workers.py::test_cached_key_is_refused_within_a_second_on_both_workers",
        "tests/e2e/test_model_activation_workers.py::test_an_activation_reaches_another_server_within_two_seconds",
        "tests/e2e/test_model_store_replicas.py::test_replicas_with_empty_disks_serve_a_registered_version_and_refetch_a_corrupt_copy",
        # The kill must land while a lease (1 s) is held: a loaded machine would miss it.
        "tests/e2e/test_multiworker_limits.py::test_leased_permits_never_let_a_window_admit_more_than_its_limit_nor_a_killed_worker_raise_it",
        "tests/e2e/test_plans_across_processes.py::test_plans_hold_across_two_serving_processes",
        "tests/e2e/test_redis_sentinel.py::test_a_master_killed_under_load_fails_over_without_a_500_or_an_overrun",
        "tests/e2e/test_usage_durability.py::test_a_worker_killed_midway_loses_no_billed_request",
        "tests/security/test_jwt.py::test_jwt_is_refused_within_a_second_on_both_workers_after_revocation",
        "tests/security/test_key_rotation_workers.py::test_rotated_key_is_refused_on_every_worker_once_the_grace_ends",
    }
)


def _module(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def _function_id(nodeid: str) -> str:
    """``module::function`` of a test, without its parameters."""
    return nodeid.split("[", 1)[0]


# Real-server modules whose tests share one server per backend and one browser (module
# fixtures): each is one unit, so that they are started once, not once per test.
SHARED_SERVER_MODULES = frozenset({"tests/e2e/test_console.py"})


def unit_of(nodeid: str) -> str:
    """The work unit of a test: itself in tests/e2e/ (but for the modules above), else its
    module."""
    module = _module(nodeid)
    if module.startswith("tests/e2e/") and module not in SHARED_SERVER_MODULES:
        return nodeid
    return module


def is_timing_critical(item: pytest.Item) -> bool:
    return _function_id(item.nodeid) in TIMING_CRITICAL


def runs_alone(item: pytest.Item) -> bool:
    return _function_id(item.nodeid) in ALONE


def starts_servers(item: pytest.Item) -> bool:
    return item.get_closest_marker("e2e") is not None


def _interleave(
    spread: list[list[pytest.Item]], among: list[list[pytest.Item]]
) -> list[pytest.Item]:
    """The ``spread`` units placed evenly between the ``among`` units, the first after a few of
    them (by then the real-server units handed out before have had time to end)."""
    ordered: list[pytest.Item] = []
    every = max(1, len(among) // max(1, len(spread)))
    pending = list(spread)
    for index, unit in enumerate(among):
        ordered.extend(unit)
        if index % every == every - 1 and pending:
            ordered.extend(pending.pop(0))
    for unit in pending:
        ordered.extend(unit)
    return ordered


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> Generator[None]:
    """Before the other implementations (before -k or --deselect leave some out): every name
    above in a collected module must still be a test there, as a renamed test would lose its
    lock silently. After them (after pytest's own reordering, which keeps a module's tests of
    one backend together): the units in the order the module docstring gives, under xdist."""
    known = {_function_id(item.nodeid) for item in items}
    modules = {_module(item.nodeid) for item in items}
    stale = sorted(name for name in TIMING_CRITICAL - known if _module(name) in modules)
    if stale:
        raise pytest.UsageError(f"tests/parallel.py names tests that do not exist: {stale}")
    yield
    if _WORKER:
        items[:] = _in_unit_order(items)


def _in_unit_order(items: list[pytest.Item]) -> list[pytest.Item]:
    units: dict[str, list[pytest.Item]] = {}
    for item in items:
        units.setdefault(unit_of(item.nodeid), []).append(item)
    longest: list[list[pytest.Item]] = []
    servers: list[list[pytest.Item]] = []
    timing: list[list[pytest.Item]] = []
    in_process: list[list[pytest.Item]] = []
    for unit in units.values():
        if _module(unit[0].nodeid) in LONGEST_FIRST:
            longest.append(unit)
        elif any(is_timing_critical(item) for item in unit):
            timing.append(unit)
        elif any(starts_servers(item) for item in unit):
            servers.append(unit)
        else:
            in_process.append(unit)
    return [item for unit in longest + servers for item in unit] + _interleave(timing, in_process)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """xdist's load-scope scheduling over this suite's units (``unit_of``)."""
    from xdist.scheduler import LoadScopeScheduling

    class UnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid)

    return UnitScheduling(config, log)


def _lock_path(name: str) -> Path:
    return Path(tempfile.gettempdir()) / f"modelgate-tests-{_RUN}.{name}.lock"


class _RunLock:
    """One of the run's locks as this worker's current test holds it: shared, or exclusive
    through its turnstile (a waiting exclusive holder keeps the turnstile, so no new shared
    holder overtakes it)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.exclusive = False
        self._files: list[IO[str]] = []

    def take(self, exclusive: bool) -> None:
        assert not self._files, f"the {self.name} lock is already held"
        turnstile = _lock_path(f"{self.name}-turnstile").open("a")
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        if not exclusive:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
            turnstile.close()
        lock = _lock_path(self.name).open("a")
        fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        self._files = [turnstile, lock] if exclusive else [lock]
        self.exclusive = exclusive

    def release(self) -> None:
        for held in reversed(self._files):
            fcntl.flock(held, fcntl.LOCK_UN)
            held.close()
        self._files = []
        self.exclusive = False


class _TestLocks:
    """The locks of the test running on this worker: the machine lock, and the server lock for a
    real-server test; always taken in that order, so that no two workers wait for each other."""

    def __init__(self, item: pytest.Item) -> None:
        self.item = item
        self.machine = _RunLock("machine")
        self.servers = _RunLock("servers") if starts_servers(item) else None
        self.quiet = False

    def take_shared(self) -> None:
        self.machine.take(exclusive=False)
        if self.servers is not None:
            self.servers.take(exclusive=False)

    def make_quiet(self) -> None:
        """Shared to exclusive, in the order above: everything held is let go first (a test
        waiting for the machine lock while holding the server lock shared would wait for a test
        waiting for the server lock while holding the machine lock shared)."""
        alone = runs_alone(self.item)
        if self.servers is not None:
            self.servers.release()
        if alone:
            self.machine.release()
            self.machine.take(exclusive=True)
        if self.servers is not None:
            self.servers.take(exclusive=True)
        self.quiet = True

    def release(self) -> None:
        if self.servers is not None:
            self.servers.release()
        self.machine.release()


_current: _TestLocks | None = None


def quiet_from_here() -> None:
    """From here to its end, the calling test (named in TIMING_CRITICAL) runs while no other
    real-server test does, and one named in ALONE while no other test does. Call it once the
    servers are started and the set-up is done, right before what is timed."""
    if _current is None:  # not under xdist: nothing else runs
        return
    name = _function_id(_current.item.nodeid)
    assert name in TIMING_CRITICAL, f"{name} is not in tests/parallel.py's TIMING_CRITICAL"
    assert not _current.quiet, "quiet_from_here() was called twice"
    _current.make_quiet()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None]:
    """Setup, call and teardown of every test under the machine lock, and of a real-server test
    under the server lock too: shared, until a timing-critical test asks for the quiet."""
    global _current
    if not _WORKER:
        return (yield)
    _current = _TestLocks(item)
    _current.take_shared()
    try:
        return (yield)
    finally:
        _current.release()
        _current = None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None]:
    """A test named in TIMING_CRITICAL must call ``quiet_from_here()``: one that does not (an
    edit moved the call away, say) would be timed on a busy machine without anyone knowing."""
    result = yield
    if _current is not None and is_timing_critical(item):
        assert _current.quiet, f"{item.nodeid} did not call tests.parallel.quiet_from_here()"
    return result
