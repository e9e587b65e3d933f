"""Settings, generated development secrets and the production refusals."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from pydantic import ValidationError

from api.app import create_app
from auth.errors import ConfigurationError
from auth.settings import Settings, check_production, load_secrets

STRONG = "s" * 48


def _settings(tmp_path: Path, **values: object) -> Settings:
    return Settings(_env_file=None, var_dir=tmp_path / "var", **values)  # type: ignore[call-arg]


def test_defaults_are_the_embedded_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DATABASE_URL", "REDIS_URL", "ENV", "MODEL_DIR", "CORS_ORIGINS"):
        monkeypatch.delenv(f"MODELGATE_{name}", raising=False)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.database_url == "sqlite+aiosqlite:///./var/modelgate.db"
    assert settings.redis_url == ""
    assert settings.env == "development"
    assert settings.model_dir == Path("./models")
    assert settings.cors_origin_list == []


def test_environment_variables_use_the_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELGATE_REDIS_URL", "redis://example:6379/0")
    monkeypatch.setenv("MODELGATE_CORS_ORIGINS", "https://a.example, https://b.example")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.redis_url == "redis://example:6379/0"
    assert settings.cors_origin_list == ["https://a.example", "https://b.example"]


def test_development_secrets_are_generated_once_with_mode_0600(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    first = load_secrets(settings)
    second = load_secrets(settings)
    assert first == second
    assert len(first.key_pepper) >= 32
    assert first.key_pepper != first.jwt_secret
    for name in ("key_pepper", "jwt_secret"):
        mode = stat.S_IMODE((tmp_path / "var" / name).stat().st_mode)
        assert mode == 0o600


def test_secrets_never_print_their_key_material(tmp_path: Path) -> None:
    secrets = load_secrets(_settings(tmp_path))
    shown = repr(secrets) + str(secrets)
    for material in (secrets.key_pepper, secrets.jwt_secret):
        assert repr(material) not in shown
        assert material.decode() not in shown


def test_production_requires_secrets(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="KEY_PEPPER is required"):
        check_production(_settings(tmp_path, env="production", jwt_secret=STRONG), workers=1)


def test_production_refuses_weak_secrets(tmp_path: Path) -> None:
    settings = _settings(tmp_path, env="production", key_pepper="short", jwt_secret=STRONG)
    with pytest.raises(ConfigurationError, match="at least 32 bytes"):
        check_production(settings, workers=1)


def test_production_refuses_the_generated_development_secrets(tmp_path: Path) -> None:
    generated = load_secrets(_settings(tmp_path))
    settings = _settings(
        tmp_path,
        env="production",
        key_pepper=generated.key_pepper.decode(),
        jwt_secret=STRONG,
    )
    with pytest.raises(ConfigurationError, match="generated development secret"):
        check_production(settings, workers=1)


def test_production_refuses_wildcard_cors(tmp_path: Path) -> None:
    settings = _settings(
        tmp_path, env="production", key_pepper=STRONG, jwt_secret=STRONG, cors_origins="*"
    )
    with pytest.raises(ConfigurationError, match="CORS"):
        check_production(settings, workers=1)


def test_production_refuses_several_workers_without_redis(tmp_path: Path) -> None:
    settings = _settings(tmp_path, env="production", key_pepper=STRONG, jwt_secret=STRONG)
    check_production(settings, workers=1)
    with pytest.raises(ConfigurationError, match="REDIS_URL"):
        check_production(settings, workers=2)
    check_production(
        _settings(
            tmp_path,
            env="production",
            key_pepper=STRONG,
            jwt_secret=STRONG,
            redis_url="redis://127.0.0.1:6379/0",
            database_url="postgresql+asyncpg://postgres@127.0.0.1:5432/test",
        ),
        workers=2,
    )


def test_production_refuses_several_workers_on_sqlite(tmp_path: Path) -> None:
    settings = _settings(
        tmp_path,
        env="production",
        key_pepper=STRONG,
        jwt_secret=STRONG,
        redis_url="redis://127.0.0.1:6379/0",
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'one.db'}",
    )
    check_production(settings, workers=1)
    with pytest.raises(ConfigurationError, match="MODELGATE_DATABASE_URL"):
        check_production(settings, workers=2)


@pytest.mark.parametrize(
    "overrides",
    [
        {"jwt_secret": STRONG},  # no pepper
        {"jwt_secret": STRONG, "key_pepper": "short"},
        {"jwt_secret": STRONG, "key_pepper": STRONG, "cors_origins": "*"},
    ],
)
def test_the_app_factory_refuses_what_serve_refuses(
    tmp_path: Path, overrides: dict[str, str]
) -> None:
    """`uvicorn --factory api.app:create_app` must not start what `modelgate serve` refuses."""
    settings = _settings(tmp_path, env="production", **overrides)
    with pytest.raises(ConfigurationError):
        create_app(settings)


def test_the_app_factory_counts_workers_from_web_concurrency(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(tmp_path, env="production", jwt_secret=STRONG, key_pepper=STRONG)
    create_app(settings)  # one worker, no Redis: allowed
    monkeypatch.setenv("WEB_CONCURRENCY", "4")
    with pytest.raises(ConfigurationError, match="REDIS_URL"):
        create_app(settings)
    with pytest.raises(ConfigurationError, match="DATABASE_URL"):
        create_app(settings.model_copy(update={"redis_url": "redis://r:6379/0"}))
    create_app(
        settings.model_copy(
            update={"redis_url": "redis://r:6379/0", "database_url": "postgresql+asyncpg://db/x"}
        )
    )


def test_production_refuses_a_short_jwt_secret_or_previous_secret(tmp_path: Path) -> None:
    settings = _settings(tmp_path, env="production", key_pepper=STRONG, jwt_secret="short")
    with pytest.raises(ConfigurationError, match="MODELGATE_JWT_SECRET must be at least 32"):
        check_production(settings, workers=1)
    settings = _settings(
        tmp_path,
        env="production",
        key_pepper=STRONG,
        jwt_secret=STRONG,
        jwt_previous_secrets=f"{STRONG}, old",
    )
    with pytest.raises(ConfigurationError, match="MODELGATE_JWT_PREVIOUS_SECRETS"):
        check_production(settings, workers=1)


def test_production_refuses_wildcard_cors_among_explicit_origins(tmp_path: Path) -> None:
    settings = _settings(
        tmp_path,
        env="production",
        key_pepper=STRONG,
        jwt_secret=STRONG,
        cors_origins="https://a.example, *",
    )
    with pytest.raises(ConfigurationError, match="MODELGATE_CORS_ORIGINS"):
        check_production(settings, workers=1)


def test_request_and_shutdown_timeouts_are_settings_with_bounds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    defaults = _settings(tmp_path)
    assert (defaults.request_timeout_seconds, defaults.shutdown_timeout_seconds) == (20.0, 30)
    monkeypatch.setenv("MODELGATE_REQUEST_TIMEOUT_SECONDS", "2.5")
    monkeypatch.setenv("MODELGATE_SHUTDOWN_TIMEOUT_SECONDS", "7")
    configured = _settings(tmp_path)
    assert (configured.request_timeout_seconds, configured.shutdown_timeout_seconds) == (2.5, 7)
    for name, value in (
        ("request_timeout_seconds", 0),
        ("request_timeout_seconds", 3601),
        ("shutdown_timeout_seconds", 0),
        ("shutdown_timeout_seconds", 0.5),
    ):
        with pytest.raises(ValidationError, match=name):
            _settings(tmp_path, **{name: value})


def test_the_fail_open_retry_interval_is_a_setting_with_bounds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _settings(tmp_path).rate_limit_open_retry_seconds == 1.0
    monkeypatch.setenv("MODELGATE_RATE_LIMIT_OPEN_RETRY_SECONDS", "0.25")
    assert _settings(tmp_path).rate_limit_open_retry_seconds == 0.25
    for value in (0, -1, 61):
        with pytest.raises(ValidationError, match="rate_limit_open_retry_seconds"):
            _settings(tmp_path, rate_limit_open_retry_seconds=value)


def test_the_model_store_and_s3_endpoint_are_checked_where_they_are_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert (_settings(tmp_path).model_store, _settings(tmp_path).s3_endpoint_url) == ("", "")
    monkeypatch.setenv("MODELGATE_MODEL_STORE", "s3://team-models/prod")
    monkeypatch.setenv("MODELGATE_S3_ENDPOINT_URL", "http://127.0.0.1:9000")
    configured = _settings(tmp_path)
    assert (configured.model_store, configured.s3_endpoint_url) == (
        "s3://team-models/prod",
        "http://127.0.0.1:9000",
    )
    for store in ("/srv/models", "file:///srv/models", "relative/models"):
        assert _settings(tmp_path, model_store=store).model_store == store
    for store in ("s3://Not_A_Bucket/x", "https://example.com/models", "file://host/x"):
        with pytest.raises(ValidationError, match="model_store"):
            _settings(tmp_path, model_store=store)
    # Credentials come from the AWS chain only: never inside the endpoint's URL.
    for endpoint in ("https://key:secret@minio.example", "ftp://minio.example", "minio:9000"):
        with pytest.raises(ValidationError, match="s3_endpoint_url"):
            _settings(tmp_path, s3_endpoint_url=endpoint)
