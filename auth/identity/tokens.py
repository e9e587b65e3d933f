"""JWT access tokens: signing, the one verification policy, records, revocation and pruning.

A token is HS256 only, and names its secret with a ``kid`` derived from the secret itself
(``key_id``): verification picks the secret from an in-memory map of the configured secrets
(the current one and those still accepted during a rotation) and from nowhere else. Nothing is
ever read, fetched or looked up from ``kid``, ``jku``, ``jwk``, ``x5u`` or ``x5c``.

Every minted token has a row in ``access_token`` (never the token): revoking the row, the key
it came from, or the admin user's password revokes the token.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import jwt
import structlog
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from auth.audit import Actor, record_event
from auth.errors import Forbidden, InvalidRequest, NotFound, Unauthenticated
from auth.models import AccessToken, utcnow
from auth.settings import Secrets, Settings

logger = structlog.get_logger(__name__)

# The one algorithm a token may use: "none", RS256/ES256 (whose "public key" an attacker would
# choose) and anything else are refused before the signature is even looked at.
ALGORITHMS = ["HS256"]
REQUIRED_CLAIMS = ["exp", "iat", "nbf", "sub", "aud", "iss", "jti"]
# Header members that would tell a verifier where to find a key: never honoured, always refused.
FORBIDDEN_HEADERS = frozenset({"jku", "jwk", "x5u", "x5c"})
# Clock skew tolerated between workers for exp, nbf and iat: a few seconds, not minutes.
LEEWAY_SECONDS = 5
# Far more than a token of ours; longer strings are refused before they are parsed.
MAX_TOKEN_LENGTH = 4096
_KID_LABEL = b"modelgate jwt kid v1\x00"
TENANT_CLAIM = "tid"
SCOPE_CLAIM = "scope"
# How long after its expiry a token's record is kept (for the operator's list) before pruning.
PRUNE_AFTER = timedelta(hours=1)


def key_id(secret: bytes) -> str:
    """The ``kid`` naming a secret: 16 hex characters of SHA-256 over a fixed label and the
    secret, which identify it without revealing it."""
    return hashlib.sha256(_KID_LABEL + secret).hexdigest()[:16]


@dataclass(frozen=True)
class TokenConfig:
    """What signing and verification need: the secrets by kid, the current kid, and the
    issuer, audience and lifetime of new tokens."""

    secrets: Mapping[str, bytes]
    current_kid: str
    issuer: str
    audience: str
    ttl_seconds: int

    @classmethod
    def build(
        cls,
        secret: bytes,
        previous: Sequence[bytes] = (),
        *,
        issuer: str,
        audience: str,
        ttl_seconds: int,
    ) -> TokenConfig:
        """The configuration for a current secret and the previous ones still accepted."""
        secrets = {key_id(old): old for old in previous}
        current = key_id(secret)
        secrets[current] = secret
        return cls(secrets, current, issuer, audience, ttl_seconds)


@dataclass(frozen=True)
class TokenClaims:
    """The claims of a verified token, typed."""

    jti: uuid.UUID
    subject: str  # "key:<api key id>" or "admin:<admin principal id>"
    kind: Literal["key", "admin"]
    subject_id: uuid.UUID
    scopes: frozenset[str]
    tenant_id: uuid.UUID | None
    expires_at: float  # epoch seconds


def _uuid(value: Any) -> uuid.UUID:
    if not isinstance(value, str) or len(value) != 36:
        raise ValueError("not a UUID")
    return uuid.UUID(value)


def verify_token(config: TokenConfig, token: str) -> TokenClaims:
    """The whole verification policy, without I/O: HS256 only, a ``kid`` among the configured
    secrets, no key-locating header, a valid signature, every required claim, exact issuer and
    audience, exp/nbf/iat within ``LEEWAY_SECONDS``. Anything else is ``Unauthenticated``."""
    if len(token) > MAX_TOKEN_LENGTH:
        raise Unauthenticated("invalid credential")
    try:
        header = jwt.get_unverified_header(token)
        if FORBIDDEN_HEADERS & header.keys():
            raise Unauthenticated("invalid credential")
        kid = header.get("kid")
        # A plain dictionary lookup: a kid that is a path, a URL or SQL is just not a key.
        secret = config.secrets.get(kid) if isinstance(kid, str) else None
        if secret is None or header.get("alg") not in ALGORITHMS:
            raise Unauthenticated("invalid credential")
        payload = jwt.decode(
            token,
            secret,
            algorithms=ALGORITHMS,
            audience=config.audience,
            issuer=config.issuer,
            leeway=LEEWAY_SECONDS,
            options={"require": REQUIRED_CLAIMS, "strict_aud": True},
        )
        # PyJWT compares these already; compared again so the policy does not rest on one
        # library version's reading of "equal" (an issuer sharing a prefix must fail).
        if payload["iss"] != config.issuer or payload["aud"] != config.audience:
            raise Unauthenticated("invalid credential")
        subject = payload["sub"]
        scope = payload.get(SCOPE_CLAIM)
        if not isinstance(subject, str) or not isinstance(scope, str) or len(scope) > 200:
            raise Unauthenticated("invalid credential")
        kind, _, raw_id = subject.partition(":")
        if kind not in ("key", "admin"):
            raise Unauthenticated("invalid credential")
        tenant = payload.get(TENANT_CLAIM)
        expires_at = payload["exp"]
        if not isinstance(expires_at, int):
            raise Unauthenticated("invalid credential")
        return TokenClaims(
            jti=_uuid(payload["jti"]),
            subject=subject,
            kind=kind,  # type: ignore[arg-type]  # checked just above
            subject_id=_uuid(raw_id),
            scopes=frozenset(scope.split()),
            tenant_id=_uuid(tenant) if tenant is not None else None,
            expires_at=float(expires_at),
        )
    except Unauthenticated:
        raise
    except Exception:
        # Bad base64, bad JSON, a huge or non-numeric time, a wrong type anywhere: the token
        # is not ours, whatever PyJWT or the standard library raised about it.
        raise Unauthenticated("invalid credential") from None


def sign_token(config: TokenConfig, claims: dict[str, Any]) -> str:
    """Sign claims with the current secret, naming it in ``kid``."""
    return jwt.encode(
        claims,
        config.secrets[config.current_kid],
        algorithm="HS256",
        headers={"kid": config.current_kid},
    )


@dataclass(frozen=True)
class MintedToken:
    """A new token and what the token endpoint answers about it."""

    access_token: str
    expires_in: int
    jti: uuid.UUID
    scopes: frozenset[str]


async def mint_token(
    session: AsyncSession,
    config: TokenConfig,
    actor: Actor,
    *,
    grant_type: Literal["client_credentials", "password"],
    scopes: frozenset[str],
    api_key_id: uuid.UUID | None = None,
    admin_principal_id: uuid.UUID | None = None,
    tenant_id: uuid.UUID | None = None,
    client_addr: str | None = None,
    not_after: datetime | None = None,
) -> MintedToken:
    """Sign a token for a key (``sub`` = ``key:<id>``) or an admin user (``admin:<id>``), record
    it and audit it as ``token.issue`` (who obtained which scopes until when, from where: the
    trail's record of every login; never the token); never outlives ``not_after`` (the key's
    expiry)."""
    if (api_key_id is None) == (admin_principal_id is None):
        raise ValueError("a token comes from exactly one key or admin user")
    now = utcnow().replace(microsecond=0)
    expires = now + timedelta(seconds=config.ttl_seconds)
    if not_after is not None and not_after < expires:
        expires = not_after.replace(microsecond=0)
    if expires <= now:
        raise Unauthenticated("credential expired")
    jti = uuid.uuid4()
    subject = f"key:{api_key_id}" if api_key_id is not None else f"admin:{admin_principal_id}"
    scope = " ".join(sorted(scopes))
    claims: dict[str, Any] = {
        "iss": config.issuer,
        "aud": config.audience,
        "sub": subject,
        "jti": str(jti),
        "iat": int(now.timestamp()),
        "nbf": int(now.timestamp()),
        "exp": int(expires.timestamp()),
        SCOPE_CLAIM: scope,
        TENANT_CLAIM: str(tenant_id) if tenant_id is not None else None,
    }
    session.add(
        AccessToken(
            jti=jti,
            subject=subject,
            grant_type=grant_type,
            api_key_id=api_key_id,
            admin_principal_id=admin_principal_id,
            tenant_id=tenant_id,
            scopes=scope,
            issued_at=now,
            expires_at=expires,
            client_addr=client_addr[:64] if client_addr else None,
        )
    )
    await session.flush()
    await record_event(
        session,
        actor,
        action="token.issue",
        target_type="access_token",
        target_id=str(jti),
        tenant_id=tenant_id,
        detail={
            "grant_type": grant_type,
            "subject": subject,
            "scopes": sorted(scopes),
            "expires_at": expires.isoformat(),
        },
    )
    return MintedToken(
        access_token=sign_token(config, claims),
        expires_in=int((expires - now).total_seconds()),
        jti=jti,
        scopes=scopes,
    )


@dataclass(frozen=True)
class TokenFilter:
    """Which token records ``list_tokens`` returns; every field is optional."""

    tenant_id: uuid.UUID | None = None
    api_key_id: uuid.UUID | None = None
    admin_principal_id: uuid.UUID | None = None
    active_only: bool = False


async def list_tokens(
    session: AsyncSession, where: TokenFilter, *, limit: int, offset: int
) -> Sequence[AccessToken]:
    """Token records, newest first (never a token)."""
    statement = select(AccessToken)
    if where.tenant_id is not None:
        statement = statement.where(AccessToken.tenant_id == where.tenant_id)
    if where.api_key_id is not None:
        statement = statement.where(AccessToken.api_key_id == where.api_key_id)
    if where.admin_principal_id is not None:
        statement = statement.where(AccessToken.admin_principal_id == where.admin_principal_id)
    if where.active_only:
        now = utcnow()
        statement = statement.where(
            AccessToken.expires_at > now,
            (AccessToken.revoked_at.is_(None)) | (AccessToken.revoked_at > now),
        )
    result = await session.scalars(
        statement.order_by(AccessToken.issued_at.desc(), AccessToken.jti)
        .limit(limit)
        .offset(offset)
    )
    return result.all()


async def revoke_token(session: AsyncSession, actor: Actor, jti: uuid.UUID) -> AccessToken:
    """Revoke a token now, audited as ``token.revoke`` once (revoking it again changes and
    records nothing); every worker refuses it within the credential cache's second."""
    record = await session.get(AccessToken, jti)
    if record is None:
        raise NotFound("token not found")
    if record.revoked_at is not None:
        return record
    record.revoked_at = utcnow()
    await session.flush()
    await record_event(
        session,
        actor,
        action="token.revoke",
        target_type="access_token",
        target_id=str(jti),
        tenant_id=record.tenant_id,
        detail={"subject": record.subject, "grant_type": record.grant_type},
    )
    return record


async def revoke_admin_user_tokens(session: AsyncSession, admin_principal_id: uuid.UUID) -> int:
    """Mark every live token of an admin user revoked (its password changed); the caller
    audits the change that caused it. Returns how many."""
    now = utcnow()
    records = await session.scalars(
        select(AccessToken).where(
            AccessToken.admin_principal_id == admin_principal_id,
            AccessToken.revoked_at.is_(None),
            AccessToken.expires_at > now,
        )
    )
    count = 0
    for record in records:
        record.revoked_at = now
        count += 1
    await session.flush()
    return count


async def prune_tokens(session: AsyncSession, *, older_than: timedelta = PRUNE_AFTER) -> int:
    """Delete the records of tokens that expired more than ``older_than`` ago (they can never
    verify again); returns how many."""
    result = await session.execute(
        delete(AccessToken).where(AccessToken.expires_at < utcnow() - older_than)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def token_config(settings: Settings, secrets: Secrets) -> TokenConfig:
    """The token configuration of a process: its secrets and the JWT settings."""
    return TokenConfig.build(
        secrets.jwt_secret,
        secrets.jwt_previous_secrets,
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        ttl_seconds=settings.jwt_ttl_seconds,
    )


async def prune_tokens_periodically(
    sessionmaker: async_sessionmaker[AsyncSession], settings: Settings
) -> None:
    """Every ``token_prune_interval_seconds``, delete long-expired token records; a failure
    (the database away) is logged and tried again next time, never fatal."""
    while True:
        await asyncio.sleep(settings.token_prune_interval_seconds)
        try:
            async with sessionmaker() as session:
                pruned = await prune_tokens(session)
                await session.commit()
            if pruned:
                logger.info("pruned expired access-token records", count=pruned)
        except Exception as exc:
            logger.warning("pruning access-token records failed", error=type(exc).__name__)


def granted_scopes(held: frozenset[str], requested: str | None) -> frozenset[str]:
    """The scopes a new token carries: those requested (space-separated), which must all be
    held (403 otherwise), or all that are held when none are named."""
    if requested is None:
        return held
    wanted = frozenset(requested.split())
    if not wanted:
        raise InvalidRequest("scope names no scope", loc=("body", "scope"))
    if not wanted <= held:
        missing = ", ".join(sorted(wanted - held))
        raise Forbidden(f"the credential does not hold the scope: {missing}")
    return wanted
