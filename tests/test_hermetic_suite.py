"""The suite is hermetic: the caller's MODELGATE_* settings and a .env in the working directory
reach no test (tests/conftest.py removes the one and disables the other at import)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from auth.settings import Settings, get_settings
from tests.conftest import is_product_setting

PRODUCTION_DOTENV = (
    "MODELGATE_ENV=production\n"
    "MODELGATE_DATABASE_URL=postgresql+asyncpg://nobody@192.0.2.1/prod\n"
    "MODELGATE_CORS_ORIGINS=*\n"
)


def test_only_the_suites_own_variables_are_left() -> None:
    assert [name for name in os.environ if is_product_setting(name)] == []


@pytest.mark.parametrize(
    ("name", "product"),
    [
        ("MODELGATE_JWT_SECRET", True),
        ("modelgate_env", True),  # pydantic-settings matches names in any case
        ("WEB_CONCURRENCY", True),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", True),  # switches FastAPI's telemetry on
        ("MODELGATE_TEST_DATABASE_URL", False),
        ("MODELGATE_TEST_REQUIRE_SERVICES", False),
        ("PATH", False),
    ],
)
def test_product_settings_are_told_from_the_suites(name: str, product: bool) -> None:
    assert is_product_setting(name) is product


def test_a_dotenv_in_the_working_directory_is_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text(PRODUCTION_DOTENV)
    # The file is one the product would obey...
    assert Settings(_env_file=tmp_path / ".env").env == "production"  # type: ignore[call-arg]
    # ...but nothing built in the test process reads it from the working directory.
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()
    try:
        assert Settings().env == "development"
        assert get_settings().database_url == "sqlite+aiosqlite:///./var/modelgate.db"
        assert get_settings().cors_origin_list == []
    finally:
        get_settings.cache_clear()


SKIPPING_TESTS = """
import pytest
from tests.conftest import NOT_APPLICABLE, not_applicable

def test_needs_a_missing_binary():
    pytest.skip("redis-server is not installed")

@pytest.mark.skipif(True, reason="Postgres unreachable")
def test_marked_skip():
    pass

def test_needs_a_missing_module():
    pytest.importorskip("a_module_that_is_not_installed")

def test_postgres_only_mechanism():
    not_applicable("SQLite has no pg_terminate_backend")

@pytest.mark.skipif(True, reason=NOT_APPLICABLE + "SQLite has no SQLSTATE")
def test_marked_not_applicable():
    pass

@pytest.mark.xfail(reason="a known bug")
def test_known_bug():
    raise AssertionError

def test_passes():
    pass
"""

# The suite's own hooks, in a throwaway pytest session.
HOOKS = "from tests.conftest import pytest_make_collect_report, pytest_runtest_makereport\n"
PLAIN = ("-p", "no:cacheprovider", "-p", "no:asyncio")


@pytest.mark.parametrize("required", [True, False], ids=["required", "not-required"])
def test_under_require_services_only_not_applicable_may_skip(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, required: bool
) -> None:
    monkeypatch.setattr("tests.conftest.REQUIRE_SERVICES", required)
    pytester.makeconftest(HOOKS)
    pytester.makepyfile(test_skips=SKIPPING_TESTS)
    result = pytester.runpytest(*PLAIN)
    if required:
        # A skip in setup (the skipif marker, a fixture) fails as an error.
        result.assert_outcomes(passed=1, failed=2, errors=1, skipped=2, xfailed=1)
        result.stdout.fnmatch_lines(
            ["*redis-server is not installed*MODELGATE_TEST_REQUIRE_SERVICES=1 requires*"]
        )
    else:
        result.assert_outcomes(passed=1, skipped=5, xfailed=1)


@pytest.mark.parametrize("required", [True, False], ids=["required", "not-required"])
def test_under_require_services_a_skipped_module_fails(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, required: bool
) -> None:
    monkeypatch.setattr("tests.conftest.REQUIRE_SERVICES", required)
    pytester.makeconftest(HOOKS)
    pytester.makepyfile(
        test_module_skip='import pytest\npytest.importorskip("a_module_that_is_not_installed")\n'
    )
    result = pytester.runpytest(*PLAIN)
    if required:
        result.assert_outcomes(errors=1)
    else:
        result.assert_outcomes(skipped=1)
