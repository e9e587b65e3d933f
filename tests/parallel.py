"""How the suite runs in parallel (``make test``: pytest-xdist, ``--dist loadgroup``), a plugin
loaded by tests/conftest.py.

Work units. A module of in-process tests is one unit (its tests share the module's database and
app, set up once); a test that starts real servers (marked ``e2e``) is a unit of its own, but
for a module whose servers are a module fixture (tests/deploy/test_nginx.py's stack), kept whole.

Order. Units are handed out in collection order, so the longest come first (the fuzzing runs,
then the other real-server tests) and the in-process modules fill the gaps; the timing-critical
tests (below) are spread among the in-process modules, so that when one of them holds the
machine the other workers have in-process work to do.

Timing. A test that starts real servers and asserts what happens within a second or two of an
event (a revocation, a window's edge, an activation) must not share the machine with other
servers, or a busy moment fails it: it holds the run's server lock exclusively, every other
real-server test holds it shared. In-process tests take no lock. The lock prefers the
exclusive holder (a turnstile): once a timing test waits, no new server test starts.

Without xdist (``pytest tests/...``) the order and the locks are left alone."""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

# Set by pytest-xdist in each worker (and the same for every worker of one run).
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID", "")

# The slowest units, first (each runs schemathesis for minutes against a real server).
LONGEST_FIRST = ("tests/e2e/test_fuzzing.py",)

# Real-server tests whose assertions are about elapsed time ("module::function", every
# parametrization): they run while no other real-server test does.
TIMING_CRITICAL = frozenset(
    {
        "tests/deploy/test_nginx.py::test_a_revocation_through_nginx_holds_on_both_replicas_within_a_second",
        "tests/e2e/test_key_cache_workers.py::test_cached_key_is_refused_within_a_second_on_both_workers",
        "tests/e2e/test_model_activation_workers.py::test_an_activation_reaches_another_server_within_two_seconds",
        "tests/e2e/test_multiworker_limits.py::test_limits_hold_exactly_across_two_separate_server_processes",
        "tests/e2e/test_multiworker_limits.py::test_no_burst_across_a_window_edge_over_two_processes",
        "tests/e2e/test_plans_across_processes.py::test_plans_hold_across_two_serving_processes",
        "tests/e2e/test_usage_durability.py::test_a_worker_killed_midway_loses_no_billed_request",
        "tests/security/test_jwt.py::test_jwt_is_refused_within_a_second_on_both_workers_after_revocation",
        "tests/security/test_key_rotation_workers.py::test_rotated_key_is_refused_on_every_worker_once_the_grace_ends",
    }
)

# Modules whose real servers are a module fixture: one unit, so that one worker starts them.
WHOLE_MODULES = frozenset({"tests/deploy/test_nginx.py"})


def _function_id(item: pytest.Item) -> str:
    """``module::function`` of a test, without its parameters."""
    return item.nodeid.split("[", 1)[0]


def _module(item: pytest.Item) -> str:
    return item.nodeid.split("::", 1)[0]


def is_timing_critical(item: pytest.Item) -> bool:
    return _function_id(item) in TIMING_CRITICAL


def starts_servers(item: pytest.Item) -> bool:
    return item.get_closest_marker("e2e") is not None


def _interleave(spread: list[pytest.Item], among: list[list[pytest.Item]]) -> list[pytest.Item]:
    """The ``spread`` items placed evenly between the ``among`` runs of items."""
    if not spread:
        return [item for run in among for item in run]
    ordered: list[pytest.Item] = []
    every = max(1, len(among) // len(spread))
    pending = list(spread)
    for index, run in enumerate(among):
        if index % every == 0 and pending:
            ordered.append(pending.pop(0))
        ordered.extend(run)
    return ordered + pending


@pytest.hookimpl(tryfirst=True)  # before xdist reads the xdist_group marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if not _WORKER:
        return
    # Every name above in a collected module must still be a test there: a renamed test would
    # lose its lock silently.
    known = {_function_id(item) for item in items}
    modules = {_module(item) for item in items}
    stale = sorted(name for name in TIMING_CRITICAL - known if name.split("::")[0] in modules)
    if stale:
        raise pytest.UsageError(f"tests/parallel.py names tests that do not exist: {stale}")

    longest: list[pytest.Item] = []
    servers: list[pytest.Item] = []
    timing: list[pytest.Item] = []
    in_process: dict[str, list[pytest.Item]] = {}
    for item in items:
        module = _module(item)
        if not starts_servers(item) or module in WHOLE_MODULES:
            item.add_marker(pytest.mark.xdist_group(Path(module).stem))
        if module in LONGEST_FIRST:
            longest.append(item)
        elif is_timing_critical(item) and module not in WHOLE_MODULES:
            timing.append(item)
        elif starts_servers(item):
            servers.append(item)
        else:
            in_process.setdefault(module, []).append(item)
    items[:] = longest + servers + _interleave(timing, list(in_process.values()))


@contextmanager
def _flock(path: Path, mode: int) -> Iterator[None]:
    with path.open("a") as lock:
        fcntl.flock(lock, mode)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _lock_path(name: str) -> Path:
    return Path(tempfile.gettempdir()) / f"modelgate-tests-{_RUN}.{name}.lock"


@contextmanager
def server_lock(exclusive: bool) -> Iterator[None]:
    """The run's server lock, shared or exclusive, taken through the turnstile: a waiting
    exclusive holder keeps the turnstile, so no new shared holder overtakes it."""
    turnstile, lock = _lock_path("turnstile"), _lock_path("servers")
    if exclusive:
        with _flock(turnstile, fcntl.LOCK_EX), _flock(lock, fcntl.LOCK_EX):
            yield
    else:
        with _flock(turnstile, fcntl.LOCK_EX):
            pass
        with _flock(lock, fcntl.LOCK_SH):
            yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None]:
    """Setup, call and teardown of a real-server test under the server lock."""
    if not (_WORKER and starts_servers(item)):
        return (yield)
    with server_lock(exclusive=is_timing_critical(item)):
        return (yield)
