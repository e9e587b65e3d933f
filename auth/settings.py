"""Runtime configuration (``MODELGATE_*`` environment variables and ``.env``) and secrets."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import multiprocessing
import os
import re
import secrets
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.exc import ArgumentError

from auth.db import is_sqlite
from auth.errors import ConfigurationError

# A secret shorter than this is refused in production: 32 bytes is HMAC-SHA256's block-size floor
# recommended by RFC 2104 and the minimum PyJWT accepts for HS256 without warning.
MIN_SECRET_LENGTH = 32


# MODELGATE_MODEL_STORE's forms besides URLs: an absolute or relative path (no scheme).
_STORE_PATH_RE = re.compile(r"^(?![A-Za-z][A-Za-z0-9+.-]*://)[^\x00]+$")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# The model registry's name pattern (ml.manifest.NAME_PATTERN; auth does not import ml).
MODEL_NAME_RE = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"


def _is_whsec(value: str) -> bool:
    """Whether ``value`` is a Standard Webhooks secret: ``whsec_`` and base64 of 24-64 bytes."""
    if not value.startswith("whsec_"):
        return False
    try:
        key = base64.b64decode(value[len("whsec_") :], validate=True)
    except (binascii.Error, ValueError):
        return False
    return 24 <= len(key) <= 64


def parse_networks(value: str) -> tuple[IPNetwork, ...]:
    """Comma-separated IP addresses and CIDR networks; ``ValueError`` naming a bad entry (a
    network with host bits set, ``10.0.0.1/8``, is refused: it is ambiguous)."""
    networks = []
    for entry in value.split(","):
        text = entry.strip()
        if not text:
            continue
        try:
            networks.append(ipaddress.ip_network(text, strict=True))
        except ValueError as exc:
            raise ValueError(
                f"MODELGATE_TRUSTED_PROXIES: {text!r} is not an IP address or network "
                f"(e.g. 10.0.0.1, 10.0.0.0/8, fd00::/8): {exc}"
            ) from None
    return tuple(networks)


class Settings(BaseSettings):
    """Every setting the product reads; names and defaults follow the contract (shared/API.md)."""

    model_config = SettingsConfigDict(
        env_prefix="MODELGATE_", env_file=".env", extra="ignore", protected_namespaces=()
    )

    env: Literal["development", "production"] = "development"
    database_url: str = "sqlite+aiosqlite:///./var/modelgate.db"
    # A Postgres streaming replica for the reports (usage, a closed month's billing export, the
    # audit listing: auth.read_replica); unset, they read the primary. Refused with a SQLite
    # primary or a SQLite URL: the embedded database has no replicas.
    database_read_url: str | None = Field(default=None, max_length=2048)
    # A replica further behind than this (seconds) is not read: the report reads the primary.
    database_read_max_lag_seconds: float = Field(default=30.0, gt=0, le=86_400)
    redis_url: str = ""
    jwt_secret: SecretStr | None = None
    key_pepper: SecretStr | None = None
    model_dir: Path = Path("./models")
    cors_origins: str = ""
    # Serve the web console (api.console) at /console/: static files, a client of the public API.
    console: bool = True
    # Where development secrets are generated and the embedded database lives.
    var_dir: Path = Path("./var")

    default_rate_limit: str = "100/minute"
    # The limit of an operator's credential (admin key or admin user's token) whose own limits
    # are not set: generous, but an admin key is still a key that can leak.
    admin_rate_limit: str = "1000/minute"
    # What rate limits do while Redis is unreachable or slower than redis_timeout_seconds:
    # "closed" answers 503 (with Retry-After); "open" applies fallback_rate_limit per key in
    # each process's memory until Redis answers again.
    rate_limit_on_redis_failure: Literal["closed", "open"] = "closed"
    fallback_rate_limit: str = "20/minute"
    # In the "open" mode, how long after a failed Redis call each process serves from its
    # fallback without asking Redis, before it tries again: a Redis that hangs costs one
    # timeout per process this often, not one per request, and service is back on Redis at
    # most this long after it returns. At most a minute: longer, a recovered Redis would sit
    # unused while every process keeps its own, looser count.
    rate_limit_open_retry_seconds: float = Field(default=1.0, gt=0, le=60)
    # A request's slot of its key's max_in_flight is dropped after this long even if never
    # released (a worker killed mid-request): longer than any request may take.
    concurrency_slot_ttl_seconds: float = Field(default=60.0, gt=0, le=3600)
    # Exact by default: the moving window counts the requests of the last window itself, so no
    # span of a window's length ever holds more than the limit, across any edge (a plan's
    # "10 per 2 seconds" means that). It keeps up to the limit's amount of timestamps per key
    # in Redis (about 20 bytes each); the sliding window counter keeps two counters whatever
    # the limit but weighs the previous window as if its requests were spread evenly, so a
    # burst just after an edge may exceed the limit in a span; a fixed window lets twice the
    # limit through around its edge.
    rate_limit_strategy: Literal["fixed-window", "moving-window", "sliding-window-counter"] = (
        "moving-window"
    )
    # Leased permits (auth.limits.leases): the most permits a worker takes from Redis in one
    # check for a busy key (a minute-or-longer window of at least 100), to spend without a round
    # trip; never more than 1/50 of the key's limit. Leases admit fewer requests at a window's
    # edge, never more. 0: every request is checked in Redis.
    rate_limit_lease_max: int = Field(default=64, ge=0, le=1000)
    # How long a Redis call may take before the request fails closed with 503.
    redis_timeout_seconds: float = Field(default=0.5, gt=0)
    # How long a verified key is trusted without asking the database again. Revocation,
    # expiry, suspension and limit changes take effect on every worker within this time, so
    # it may not exceed the 1 second that the contract promises.
    key_cache_ttl_seconds: float = Field(default=1.0, gt=0, le=1.0)
    key_cache_size: int = Field(default=10_000, ge=1)
    # Group commit of usage (auth.usage.writer): at most this many records per transaction,
    # and how long the writer may wait for more before it flushes (0: flush as soon as the
    # previous commit is done, which already batches everything that arrived meanwhile).
    usage_flush_max_records: int = Field(default=500, ge=1, le=5000)
    usage_flush_wait_ms: float = Field(default=0.0, ge=0, le=100)
    # A flush that takes longer fails: its requests get 503 instead of hanging.
    usage_flush_timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    # The longest a database statement may run (Postgres: the server's statement_timeout, and
    # the driver's own timeout for a server that stops answering). The slowest statement of a
    # request is the usage report, a few milliseconds; the default leaves room for a loaded
    # database while still bounding every request that waits on it.
    database_timeout_seconds: float = Field(default=5.0, gt=0, le=300)
    # How many whole UTC days of raw usage records `modelgate usage prune` keeps when no
    # --before is given (None: it needs --before). Reports and exports read the rollups, which
    # are kept whatever this says.
    usage_retention_days: int | None = Field(default=None, ge=1, le=36_500)
    # How often each worker writes the keys' last use (auth.identity.key_activity):
    # api_key.last_used_at lags by at most this much, and costs one statement per interval, not
    # one per request.
    key_last_used_flush_seconds: float = Field(default=10.0, ge=0.05, le=3600)
    max_batch_size: int = Field(default=100, ge=1, le=1000)
    # Where `modelgate models pull` (ml.pull) finds models: an MLflow tracking server for
    # models:/ sources (s3:// ones use s3_endpoint_url below), and the largest artifact a pull
    # downloads.
    mlflow_tracking_uri: str | None = Field(default=None, max_length=2048)
    pull_max_bytes: int = Field(default=512 * 1024 * 1024, ge=1024, le=64 * 1024**3)
    # How often each worker checks every loaded model version (a canary prediction and a
    # re-hash of its files, in a thread): a version that fails is reloaded from the registry,
    # and is not served while it stays broken (api.server.activations).
    model_check_interval_seconds: float = Field(default=30.0, gt=0, le=86_400)
    # Where published model versions' files live (ml.store), shared by every replica, whose
    # model_dir is then a verified cache of it: "" (the model directory itself is the store, as
    # it always was), a path or a file:// URL (a local or shared directory), or
    # s3://bucket/prefix (credentials from the standard AWS chain only).
    model_store: str = Field(default="", max_length=1000)
    # An S3-compatible service instead of AWS (MinIO, Ceph, GCS's S3 endpoint): http(s)://host,
    # for every s3:// location (the model store's and the pulls').
    s3_endpoint_url: str = Field(default="", max_length=1000)
    # Micro-batching of the scikit-learn runtime (ml.batching): concurrent requests for one
    # version of up to batch_max_size rows share one predict_proba call; the first row of an
    # idle batcher waits at most batch_max_wait_ms for company. ONNX versions keep their direct
    # calls (concurrent ONNX requests of one event-loop turn already share a call).
    batch_enabled: bool = True
    batch_max_size: int = Field(default=32, ge=1, le=1000)
    batch_max_wait_ms: float = Field(default=2.0, ge=0, le=10)
    # The prediction cache (api.inference.cache) keeps each /predict answer this long, per
    # tenant, model version and exact features: on Redis when redis_url is set, else in each
    # process's memory (at most prediction_cache_size answers). 0: no cache (the default: with
    # ONNX a lookup costs about as much as the prediction; see docs/models.md, the prediction
    # cache).
    prediction_cache_ttl_seconds: float = Field(default=0.0, ge=0, le=86_400)
    prediction_cache_size: int = Field(default=10_000, ge=1, le=1_000_000)
    max_body_bytes: int = Field(default=256 * 1024, ge=1024)
    # How long the answer to a request sent with an Idempotency-Key is kept for its retries
    # (auth.idempotency); expired answers are pruned in bulk batches every 10 minutes
    # (auth.idempotency.PRUNE_INTERVAL_SECONDS).
    idempotency_ttl_seconds: int = Field(default=86_400, ge=60, le=30 * 86_400)
    # The Open Inference Protocol over gRPC (api/grpc/): off unless a port is given; every worker
    # serves it on that port (SO_REUSEPORT). Its host is `modelgate serve --host` unless set.
    grpc_port: int | None = Field(default=None, ge=1, le=65535)
    grpc_host: str = "127.0.0.1"
    # How long a request may run before it is answered 503 and cancelled (api.http.timeout): until
    # its response starts, or until its usage is handed to the usage writer, whichever comes
    # first (from then on it finishes, so that it is never billed without its answer).
    request_timeout_seconds: float = Field(default=20.0, gt=0, le=3600)
    # On SIGTERM each worker stops accepting and gives its requests in flight this long to
    # finish (uvicorn's timeout_graceful_shutdown), then has this long again to flush the
    # pending usage and close its pools (api.app.lifespan). Longer than the request timeout, so
    # that the drain lets every request end by its own deadline.
    shutdown_timeout_seconds: int = Field(default=30, ge=1, le=3600)
    log_level: str = "INFO"
    # "json": one JSON object per line, for log shippers; "console": structlog's coloured,
    # aligned lines for a developer's terminal (`make run` uses it).
    log_format: Literal["json", "console"] = "json"
    # The bearer token GET /metrics asks for (None: the route is public). As long as the other
    # secrets: a scrape's figures are the operator's, and nothing throttles guesses at it.
    metrics_token: SecretStr | None = Field(default=None, min_length=MIN_SECRET_LENGTH)

    # JWT access tokens (auth.identity.tokens). A token is verified against the current secret or
    # one of the previous ones (comma-separated, kept for verification only during a rotation).
    jwt_ttl_seconds: int = Field(default=900, ge=60, le=86_400)
    jwt_issuer: str = Field(default="modelgate", min_length=1, max_length=200)
    jwt_audience: str = Field(default="modelgate-api", min_length=1, max_length=200)
    jwt_previous_secrets: SecretStr | None = None
    # Failed logins at POST /auth/token that each client address and each account (key prefix
    # or e-mail) may make before further attempts are refused with 429 (SECURITY.md line 8).
    login_failures_per_address: str = Field(
        default="20/minute", pattern=r"^[1-9][0-9]{0,5}/(second|minute|hour|day)$"
    )
    login_failures_per_account: str = Field(
        default="5/minute", pattern=r"^[1-9][0-9]{0,5}/(second|minute|hour|day)$"
    )
    # Failed credentials (API keys and JWTs on any route, /auth/token included) that one client
    # address may present before its uncached credentials are refused with 429 without any
    # lookup (auth.identity.failure_throttle). Generous: a client that fails this often is
    # guessing, not mistyping.
    auth_failures_per_address: str = Field(
        default="60/minute", pattern=r"^[1-9][0-9]{0,5}/(second|minute|hour|day)$"
    )
    # Comma-separated addresses and networks (CIDR) of the reverse proxies in front of the
    # service: only a peer among them is believed about X-Forwarded-For (api.http.forwarded).
    trusted_proxies: str = ""
    # How often each worker deletes access-token records that expired a while ago.
    token_prune_interval_seconds: float = Field(default=600.0, gt=0, le=86_400)

    # Signed webhooks that announce new model versions (api.routes.webhooks). Each route answers
    # 404 while its secret is unset: nothing unsigned is ever accepted.
    # The secret given to MLflow's create_webhook(secret=...): its HMAC key, any string.
    mlflow_webhook_secret: SecretStr | None = Field(default=None, min_length=16, max_length=1024)
    # The generic Standard Webhooks secret: "whsec_" and base64 of 24 to 64 random bytes.
    webhook_secret: SecretStr | None = Field(default=None, max_length=200)
    # MLflow registered model name -> the name modelgate serves it under (JSON object). An
    # unmapped MLflow name is served under itself if it is a valid modelgate name, else refused.
    mlflow_model_names: dict[str, str] = Field(default_factory=dict, max_length=1000)
    # The MLflow alias whose model_version_alias.created means "activate this version".
    mlflow_activate_alias: str = Field(
        default="champion", min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_-]+$"
    )

    @field_validator("database_read_url", mode="before")
    @classmethod
    def _empty_read_url_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("database_read_url")
    @classmethod
    def _read_url_is_postgres(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return value
        try:
            sqlite = is_sqlite(value) or is_sqlite(info.data.get("database_url", ""))
        except ArgumentError:
            # Not the URL itself in the message: it holds the replica's password.
            raise ValueError("not a database URL") from None
        if sqlite:
            raise ValueError(
                "must be a Postgres streaming replica of a Postgres MODELGATE_DATABASE_URL: "
                "the embedded SQLite database has no replica (unset it)"
            )
        return value

    # Outgoing events (auth.events): signed deliveries to tenants' and operators' endpoints.
    # Let endpoints resolve to loopback, private, link-local or metadata addresses (tests and
    # closed networks only): off, every such URL is refused at registration and at delivery.
    webhook_allow_private_targets: bool = False
    # How often each worker looks for events to deliver when it found none.
    event_dispatch_interval_seconds: float = Field(default=1.0, gt=0, le=60)
    # One delivery's connect timeout and total budget (connect, send, read the answer).
    event_connect_timeout_seconds: float = Field(default=3.0, gt=0, le=60)
    event_delivery_timeout_seconds: float = Field(default=10.0, gt=0, le=120)
    # Deliveries in flight at once per worker, and to one endpoint: a slow endpoint holds at
    # most its own share.
    event_max_concurrency: int = Field(default=16, ge=1, le=256)
    event_max_per_endpoint: int = Field(default=2, ge=1, le=64)
    # An endpoint whose deliveries all failed for this long is disabled (with the reason).
    event_disable_after_seconds: float = Field(default=86_400.0, gt=0, le=30 * 86_400)
    # Seconds to wait after each failed attempt, comma-separated (empty: the dispatcher's
    # RETRY_SCHEDULE, about a day); jittered by +-20%.
    event_retry_schedule_seconds: str = Field(
        default="", max_length=200, pattern=r"^$|^[0-9.]+(,[0-9.]+){0,19}$"
    )
    # How often each worker looks for keys about to expire (key.expiring).
    key_expiry_sweep_interval_seconds: float = Field(default=300.0, gt=0, le=86_400)

    @field_validator("metrics_token", mode="before")
    @classmethod
    def _empty_metrics_token_is_none(cls, value: object) -> object:
        # MODELGATE_METRICS_TOKEN= (set but empty) leaves the route public, as unset does.
        return None if value == "" else value

    @field_validator("mlflow_webhook_secret", "webhook_secret", mode="before")
    @classmethod
    def _empty_webhook_secret_is_none(cls, value: object) -> object:
        # Set but empty: the route stays off, as unset.
        return None if value == "" else value

    @field_validator("webhook_secret")
    @classmethod
    def _standard_webhooks_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not _is_whsec(value.get_secret_value()):
            # Never echo the value: it is a secret, even a malformed one.
            raise ValueError(
                "MODELGATE_WEBHOOK_SECRET must be whsec_ followed by base64 of 24 to 64 bytes"
            )
        return value

    @field_validator("mlflow_model_names")
    @classmethod
    def _served_names_are_model_names(cls, value: dict[str, str]) -> dict[str, str]:
        for mlflow_name, served in value.items():
            if not (0 < len(mlflow_name) <= 256) or not re.fullmatch(MODEL_NAME_RE, served):
                raise ValueError(
                    f"MODELGATE_MLFLOW_MODEL_NAMES: {served!r} (for {mlflow_name[:256]!r}) is "
                    "not a valid model name (letters, digits, _ and -, at most 64)"
                )
        return value

    @field_validator("model_store")
    @classmethod
    def _valid_model_store(cls, value: str) -> str:
        # The same forms as ml.store.open_store (auth does not import ml); a typo stops the
        # server at start-up rather than serving from the wrong place.
        value = value.strip()
        if not value or _STORE_PATH_RE.fullmatch(value):
            return value
        parts = urlsplit(value)
        if parts.scheme == "s3":
            if not _BUCKET_RE.fullmatch(parts.netloc) or parts.query or parts.fragment:
                raise ValueError("an s3:// model store is s3://bucket/prefix")
            return value
        if parts.scheme == "file" and parts.netloc in ("", "localhost") and parts.path:
            return value
        raise ValueError("the model store is a path, a file:///path URL or s3://bucket/prefix")

    @field_validator("s3_endpoint_url")
    @classmethod
    def _valid_s3_endpoint(cls, value: str) -> str:
        value = value.strip()
        if not value:
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("the S3 endpoint is an http:// or https:// URL")
        if parts.username or parts.password or parts.query or parts.fragment:
            # Credentials come from the AWS chain only, never from a URL.
            raise ValueError("the S3 endpoint URL holds no credentials, query or fragment")
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _valid_trusted_proxies(cls, value: str) -> str:
        # Parsed here so that a typo stops the server at start-up with the entry named, rather
        # than silently trusting nothing (or everything).
        parse_networks(value)
        return value

    @property
    def trusted_proxy_networks(self) -> tuple[IPNetwork, ...]:
        """The trusted proxies' networks (a single address is a /32 or /128)."""
        return parse_networks(self.trusted_proxies)

    @property
    def cors_origin_list(self) -> list[str]:
        """The configured CORS origins, without blanks."""
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    @property
    def is_production(self) -> bool:
        """Whether the strict production checks apply."""
        return self.env == "production"


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()


@dataclass(frozen=True)
class Secrets:
    """Key material: the pepper for API-key digests and the JWT signing secret."""

    # Left out of the repr: a traceback, a log line or a debugger must never print key material.
    key_pepper: bytes = field(repr=False)
    jwt_secret: bytes = field(repr=False)
    # Earlier signing secrets, still accepted for verification during a rotation.
    jwt_previous_secrets: tuple[bytes, ...] = field(default=(), repr=False)


def _generated_secret(var_dir: Path, name: str) -> str:
    """Read ``var/<name>``, creating it once (mode 0600) with a fresh random value if absent."""
    var_dir.mkdir(parents=True, exist_ok=True)
    path = var_dir / name
    try:
        # O_EXCL makes the first of several starting workers the only writer.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        value = path.read_text().strip()
        if value:
            return value
        raise ConfigurationError(f"{path} is empty; delete it to generate a new secret") from None
    value = secrets.token_urlsafe(48)
    with os.fdopen(fd, "w") as handle:
        handle.write(value + "\n")
    return value


def load_secrets(settings: Settings) -> Secrets:
    """Resolve the secrets; in development missing ones are generated once into ``var/``."""
    resolved: dict[str, str] = {}
    for name in ("key_pepper", "jwt_secret"):
        configured: SecretStr | None = getattr(settings, name)
        if configured is not None and configured.get_secret_value():
            resolved[name] = configured.get_secret_value()
        elif settings.is_production:
            raise ConfigurationError(f"MODELGATE_{name.upper()} is required in production")
        else:
            resolved[name] = _generated_secret(settings.var_dir, name)
    previous = settings.jwt_previous_secrets
    return Secrets(
        key_pepper=resolved["key_pepper"].encode(),
        jwt_secret=resolved["jwt_secret"].encode(),
        jwt_previous_secrets=tuple(
            part.strip().encode()
            for part in (previous.get_secret_value() if previous else "").split(",")
            if part.strip()
        ),
    )


def declared_workers() -> int:
    """How many worker processes this one is likely to be among, as far as a worker can tell:
    ``WEB_CONCURRENCY`` (which uvicorn and gunicorn read for their worker count), or at least
    two when a multiprocessing parent (uvicorn's supervisor) started this process."""
    try:
        declared = int(os.environ.get("WEB_CONCURRENCY", "1"))
    except ValueError:
        declared = 1
    if multiprocessing.parent_process() is not None:
        declared = max(declared, 2)
    return max(declared, 1)


def check_production(settings: Settings, workers: int) -> None:
    """Refuse to start in production with missing, weak or generated secrets, ``*`` CORS, or
    several workers without a shared Redis or on SQLite."""
    if not settings.is_production:
        return
    secrets_ = load_secrets(settings)
    for name, value in (("KEY_PEPPER", secrets_.key_pepper), ("JWT_SECRET", secrets_.jwt_secret)):
        if len(value) < MIN_SECRET_LENGTH:
            raise ConfigurationError(
                f"MODELGATE_{name} must be at least {MIN_SECRET_LENGTH} bytes in production"
            )
        generated = settings.var_dir / name.lower()
        if generated.exists() and generated.read_text().strip().encode() == value:
            raise ConfigurationError(
                f"MODELGATE_{name} is the generated development secret; set a real one"
            )
    if any(len(value) < MIN_SECRET_LENGTH for value in secrets_.jwt_previous_secrets):
        raise ConfigurationError(
            "every MODELGATE_JWT_PREVIOUS_SECRETS entry must be at least "
            f"{MIN_SECRET_LENGTH} bytes in production"
        )
    mlflow_secret = settings.mlflow_webhook_secret
    if mlflow_secret is not None and len(mlflow_secret.get_secret_value()) < MIN_SECRET_LENGTH:
        raise ConfigurationError(
            f"MODELGATE_MLFLOW_WEBHOOK_SECRET must be at least {MIN_SECRET_LENGTH} characters "
            "in production"
        )
    if "*" in settings.cors_origin_list:
        raise ConfigurationError("MODELGATE_CORS_ORIGINS may not be '*' in production")
    if workers > 1 and not settings.redis_url:
        raise ConfigurationError(
            "several workers need MODELGATE_REDIS_URL: in-process rate limits are per worker"
        )
    if workers > 1 and settings.database_url.startswith("sqlite"):
        raise ConfigurationError(
            "several workers need a database server in MODELGATE_DATABASE_URL (Postgres): "
            "SQLite takes one writer at a time"
        )
