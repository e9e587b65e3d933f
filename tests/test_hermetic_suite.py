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
