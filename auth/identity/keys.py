"""API keys: generation, checksum, peppered digest, issue and listing.

A key is ``mg_`` + 43 base62 characters (256 random bits) + a 6-character base62 CRC-32 of the
body. The checksum is not a security control: it lets a typo or a forged-looking string be refused
before any database access. Only HMAC-SHA256(pepper, key) is stored.
"""

from __future__ import annotations

import hmac
import secrets
import string
import uuid
import zlib
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from auth.audit import Actor, record_event
from auth.errors import Conflict, Forbidden, InvalidRequest, NotFound, Unauthenticated
from auth.events.outbox import emit
from auth.limits.plans import check_max_in_flight, check_rate_limits
from auth.models import ApiKey, Tenant, utcnow
from auth.schemas import IssuedKey, KeyView

KEY_PREFIX = "mg_"
_ALPHABET = string.digits + string.ascii_letters
_BODY_LENGTH = 43  # ceil(256 / log2(62))
_CHECKSUM_LENGTH = 6  # ceil(32 / log2(62))
KEY_LENGTH = len(KEY_PREFIX) + _BODY_LENGTH + _CHECKSUM_LENGTH
_ALPHABET_SET = frozenset(_ALPHABET)
# Enough of the key to recognise it in a list, far too little to matter to an attacker.
DISPLAY_PREFIX_LENGTH = len(KEY_PREFIX) + 8

TENANT_SCOPES = frozenset({"predict", "usage:read", "keys:manage", "webhooks:manage"})
ADMIN_SCOPE = "admin"
DEFAULT_TENANT_SCOPES = ("predict", "usage:read")
# Keys expire before this moment or never: a later expiry is no expiry, and every date before
# it converts to any time zone without overflowing.
LATEST_EXPIRY = datetime(3000, 1, 1, tzinfo=UTC)
# The longest a rotated key keeps working beside its successor: long enough to roll a new key
# out to every client, short enough that a rotation is never a revocation forgotten.
MAX_ROTATION_GRACE_SECONDS = 7 * 24 * 3600


def _base62(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, remainder = divmod(number, 62)
        digits.append(_ALPHABET[remainder])
    return "".join(reversed(digits))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode()), _CHECKSUM_LENGTH)


def generate_key() -> str:
    """A new random API key with its checksum."""
    body = _base62(int.from_bytes(secrets.token_bytes(32), "big"), _BODY_LENGTH)
    return KEY_PREFIX + body + _checksum(body)


def looks_like_key(credential: str) -> bool:
    """Whether the credential is meant to be an API key (rather than a JWT)."""
    return credential.startswith(KEY_PREFIX)


def has_valid_checksum(key: str) -> bool:
    """Whether the key is well formed and its checksum matches; no database access."""
    if len(key) != KEY_LENGTH or not key.startswith(KEY_PREFIX):
        return False
    body = key[len(KEY_PREFIX) : -_CHECKSUM_LENGTH]
    checksum = key[-_CHECKSUM_LENGTH:]
    if not _ALPHABET_SET.issuperset(body) or not _ALPHABET_SET.issuperset(checksum):
        return False
    return hmac.compare_digest(_checksum(body), checksum)


def key_digest(pepper: bytes, key: str) -> str:
    """The stored form of a key: hex HMAC-SHA256 under the server-side pepper."""
    # hmac.digest is the one-shot C path: the same value as hmac.new(...).hexdigest(), faster.
    return hmac.digest(pepper, key.encode(), "sha256").hex()


def normalize_scopes(scopes: Iterable[str], allowed: frozenset[str]) -> str:
    """Validate scopes against what the owner may hold; returns the stored form."""
    unique = sorted(set(scopes))
    if not unique:
        raise InvalidRequest("at least one scope is required", loc=("scopes",))
    unknown = [s for s in unique if s not in allowed]
    if unknown:
        raise InvalidRequest(f"unknown scopes: {', '.join(unknown)}", loc=("scopes",))
    return " ".join(unique)


async def issue_tenant_key(
    session: AsyncSession,
    pepper: bytes,
    actor: Actor,
    *,
    tenant_id: uuid.UUID,
    name: str,
    scopes: Sequence[str] = DEFAULT_TENANT_SCOPES,
    expires_at: datetime | None = None,
    max_scopes: frozenset[str] | None = None,
    created_by: uuid.UUID | None = None,
    rate_limits: str | None = None,
    max_in_flight: int | None = None,
) -> IssuedKey:
    """Create a key for a tenant, audited as ``key.issue``; the key is in the result only and
    never retrievable again. With ``max_scopes`` (self-service: the calling credential's
    scopes) a scope beyond them is refused with 403: no credential can mint a stronger one.
    With ``created_by`` (self-service: the key behind the calling credential) the new key may
    not outlive that key: an ``expires_at`` after the creator's end is refused with 422, and a
    key without one expires at the creator's end (``_bounded_by_creator``)."""
    if await session.get(Tenant, tenant_id) is None:
        raise NotFound("tenant not found")
    if max_scopes is not None and not set(scopes) <= max_scopes:
        beyond = ", ".join(sorted(set(scopes) - max_scopes))
        raise Forbidden(f"a new key may not hold scopes this credential lacks: {beyond}")
    if created_by is not None:
        expires_at = await _bounded_by_creator(session, created_by, expires_at)
    if expires_at is not None and expires_at <= utcnow():
        raise InvalidRequest("expires_at must be in the future", loc=("expires_at",))
    if expires_at is not None and expires_at >= LATEST_EXPIRY:
        raise InvalidRequest(
            f"expires_at must be before {LATEST_EXPIRY:%Y-%m-%d}", loc=("expires_at",)
        )
    _check_key_limits(rate_limits, max_in_flight)
    key, secret = await _insert_key(
        session,
        pepper,
        name=name,
        scopes=normalize_scopes(scopes, TENANT_SCOPES),
        tenant_id=tenant_id,
        expires_at=expires_at,
        rate_limits=rate_limits,
        max_in_flight=max_in_flight,
    )
    await record_event(
        session,
        actor,
        action="key.issue",
        target_type="api_key",
        target_id=str(key.id),
        tenant_id=tenant_id,
        detail=_key_detail(key),
    )
    return IssuedKey.issued(key, secret)


async def _creator_end(session: AsyncSession, creator_id: uuid.UUID) -> datetime | None:
    """When the key ``creator_id`` stops working (the earlier of its expiry and a scheduled
    revocation), read from the database; None: never. 401 when it no longer works."""
    creator = await session.get(ApiKey, creator_id, populate_existing=True)
    if creator is None:
        raise Unauthenticated("invalid credential")
    ends = [moment for moment in (creator.expires_at, creator.revoked_at) if moment is not None]
    if not ends:
        return None
    end = min(ends)
    if end <= utcnow():
        # It ended after the request's credential was checked (within the key cache's TTL).
        raise Unauthenticated("credential expired")
    return end


async def _bounded_by_creator(
    session: AsyncSession, creator_id: uuid.UUID, expires_at: datetime | None
) -> datetime | None:
    """The expiry of a key that the key ``creator_id`` issues for itself: ``expires_at``, or the
    creator's end when none is asked for; 422 for one after the creator's end.

    "The credential that created it" is the API key behind the request: the calling key, or
    the key the calling JWT was minted from. Its end is the earlier of its expiry and a
    revocation already scheduled (a rotation's grace), read from the database here, not from
    the authenticator's cache. A token's own ``exp`` does not bound the new key: a token is a
    short-lived session of its key, which mints another whenever it likes while it lives and
    carries at most the key's scopes; capping at the token's minutes would make every key
    issued through a token a minutes-long key, and bound nothing the key's holder could not
    get by calling with the key itself. What a stolen token can do, it can do until its key
    ends, and so can what it issues."""
    end = await _creator_end(session, creator_id)
    if end is None:
        return expires_at
    if expires_at is None:
        return end
    if expires_at > end:
        raise InvalidRequest(
            f"expires_at may not be later than the calling credential's own end, {end.isoformat()}",
            loc=("expires_at",),
        )
    return expires_at


async def issue_admin_key(
    session: AsyncSession,
    pepper: bytes,
    actor: Actor,
    *,
    admin_principal_id: uuid.UUID,
    name: str,
) -> IssuedKey:
    """Create an admin key (scope ``admin``) for an operator principal, audited as
    ``admin_key.issue``."""
    key, secret = await _insert_key(
        session, pepper, name=name, scopes=ADMIN_SCOPE, admin_principal_id=admin_principal_id
    )
    await record_event(
        session,
        actor,
        action="admin_key.issue",
        target_type="api_key",
        target_id=str(key.id),
        detail={**_key_detail(key), "admin_principal_id": str(admin_principal_id)},
    )
    return IssuedKey.issued(key, secret)


def _key_detail(key: ApiKey) -> dict[str, object]:
    """What the audit trail records about a key: never the key or its digest."""
    return {
        "name": key.name,
        "prefix": key.display_prefix,
        "scopes": sorted(key.scope_set),
        "expires_at": key.expires_at.isoformat() if key.expires_at else None,
        "rate_limits": key.rate_limits,
        "max_in_flight": key.max_in_flight,
    }


async def _insert_key(
    session: AsyncSession,
    pepper: bytes,
    *,
    name: str,
    scopes: str,
    tenant_id: uuid.UUID | None = None,
    admin_principal_id: uuid.UUID | None = None,
    expires_at: datetime | None = None,
    rotated_from_id: uuid.UUID | None = None,
    rate_limits: str | None = None,
    max_in_flight: int | None = None,
) -> tuple[ApiKey, str]:
    key = generate_key()
    row = ApiKey(
        tenant_id=tenant_id,
        admin_principal_id=admin_principal_id,
        name=name,
        display_prefix=key[:DISPLAY_PREFIX_LENGTH],
        digest=key_digest(pepper, key),
        scopes=scopes,
        expires_at=expires_at,
        rotated_from_id=rotated_from_id,
        rate_limits=rate_limits,
        max_in_flight=max_in_flight,
    )
    session.add(row)
    await session.flush()
    return row, key


async def list_tenant_keys(session: AsyncSession, tenant_id: uuid.UUID) -> list[KeyView]:
    """A tenant's keys, newest first (metadata only; the digest never leaves this module)."""
    if await session.get(Tenant, tenant_id) is None:
        raise NotFound("tenant not found")
    result = await session.scalars(
        select(ApiKey)
        .where(ApiKey.tenant_id == tenant_id)
        .order_by(ApiKey.created_at.desc(), ApiKey.id)
    )
    return [KeyView.of(key) for key in result]


async def _owned_key(
    session: AsyncSession, key_id: uuid.UUID, tenant_id: uuid.UUID | None
) -> ApiKey:
    """The key, or ``NotFound``; with ``tenant_id``, another tenant's key is not found either
    (a tenant must not learn that it exists)."""
    key = await session.get(ApiKey, key_id)
    if key is None or (tenant_id is not None and key.tenant_id != tenant_id):
        raise NotFound("key not found")
    return key


async def revoke_key(
    session: AsyncSession,
    actor: Actor,
    key_id: uuid.UUID,
    *,
    tenant_id: uuid.UUID | None = None,
) -> KeyView:
    """Revoke a key now, audited as ``key.revoke``; revoking a revoked key changes nothing and
    records nothing. Every worker refuses it within the key cache's TTL (1 second). With
    ``tenant_id`` only that tenant's keys can be revoked (self-service)."""
    key = await _owned_key(session, key_id, tenant_id)
    now = utcnow()
    if key.revoked_at is not None and key.revoked_at <= now:
        return KeyView.of(key)
    # A revocation scheduled for later (a rotation's grace) is brought forward.
    key.revoked_at = now
    await session.flush()
    await record_event(
        session,
        actor,
        action="key.revoke",
        target_type="api_key",
        target_id=str(key.id),
        tenant_id=key.tenant_id,
        detail={"prefix": key.display_prefix},
    )
    if key.tenant_id is not None:
        # In the same transaction as the revocation: the event exists if and only if it does.
        await emit(
            session,
            "key.revoked",
            {"key_id": str(key.id), "name": key.name, "prefix": key.display_prefix},
            tenant_id=key.tenant_id,
        )
    return KeyView.of(key)


def _check_key_limits(rate_limits: str | None, max_in_flight: int | None) -> None:
    if rate_limits is not None:
        check_rate_limits(rate_limits)
    check_max_in_flight(max_in_flight)


# What ``update_key_limits`` may change.
KEY_LIMIT_FIELDS = frozenset({"rate_limits", "max_in_flight"})


async def update_key_limits(
    session: AsyncSession, actor: Actor, key_id: uuid.UUID, changes: dict[str, object]
) -> KeyView:
    """Set or clear (None) a tenant key's own ``rate_limits`` and ``max_in_flight``, audited as
    ``key.update``; every worker applies them within the key cache's TTL. An admin key's limit
    is the server's (``MODELGATE_ADMIN_RATE_LIMIT``): 422 for one."""
    unknown = set(changes) - KEY_LIMIT_FIELDS
    if unknown:
        raise InvalidRequest(f"a key's {', '.join(sorted(unknown))} cannot change here")
    rate_limits = changes.get("rate_limits")
    max_in_flight = changes.get("max_in_flight")
    if not isinstance(rate_limits, str | None) or not isinstance(max_in_flight, int | None):
        raise InvalidRequest("rate_limits is text and max_in_flight an integer")
    _check_key_limits(rate_limits, max_in_flight)
    key = await _owned_key(session, key_id, None)
    if key.tenant_id is None:
        raise InvalidRequest("only a tenant's key carries limits of its own")
    for field, value in changes.items():
        setattr(key, field, value)
    await session.flush()
    await record_event(
        session,
        actor,
        action="key.update",
        target_type="api_key",
        target_id=str(key.id),
        tenant_id=key.tenant_id,
        detail=dict(changes),
    )
    return KeyView.of(key)


async def rotate_key(
    session: AsyncSession,
    pepper: bytes,
    actor: Actor,
    key_id: uuid.UUID,
    *,
    grace_seconds: int,
    tenant_id: uuid.UUID | None = None,
    max_scopes: frozenset[str] | None = None,
    created_by: uuid.UUID | None = None,
) -> IssuedKey:
    """Replace a live key by a new one with the same owner, name, scopes and expiry, audited as
    ``key.rotate``. The old key keeps working for ``grace_seconds`` (0: it is revoked now) and
    fails on every worker from then on; revoking it meanwhile takes effect at once. A revoked,
    expired or already rotated key is a 409. The new key is in the result only.

    Self-service (a tenant's credential) passes ``tenant_id`` (another tenant's key is 404),
    and the bounds that issuing a key has, since a rotation hands over a new secret too: with
    ``max_scopes`` a key holding a scope the calling credential lacks, and with ``created_by``
    (the key behind the calling credential) a key that outlives that key, are 403."""
    if not 0 <= grace_seconds <= MAX_ROTATION_GRACE_SECONDS:
        raise InvalidRequest(
            f"grace_seconds must be from 0 to {MAX_ROTATION_GRACE_SECONDS}",
            loc=("grace_seconds",),
        )
    old = await _owned_key(session, key_id, tenant_id)
    if max_scopes is not None and not old.scope_set <= max_scopes:
        beyond = ", ".join(sorted(old.scope_set - max_scopes))
        raise Forbidden(f"this credential may not rotate a key with scopes it lacks: {beyond}")
    if created_by is not None:
        end = await _creator_end(session, created_by)
        if end is not None and (old.expires_at is None or old.expires_at > end):
            raise Forbidden(
                "this credential may not rotate a key that outlives it (its own end is "
                f"{end.isoformat()})"
            )
    now = utcnow()
    ends_at = now + timedelta(seconds=grace_seconds)
    # One conditional UPDATE decides: of two concurrent rotations of a key only one can
    # schedule its revocation, and so only one successor is ever issued.
    scheduled = await session.execute(
        update(ApiKey)
        .where(
            ApiKey.id == old.id,
            ApiKey.revoked_at.is_(None),
            or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > now),
        )
        .values(revoked_at=ends_at)
        .execution_options(synchronize_session=False)
    )
    # Read again either way: what the UPDATE wrote, or what made it refuse (which may be a
    # concurrent rotation's revocation).
    await session.refresh(old)
    if scheduled.rowcount != 1:  # type: ignore[attr-defined]
        raise Conflict(_not_rotatable(old, now))
    new, secret = await _insert_key(
        session,
        pepper,
        name=old.name,
        scopes=old.scopes,
        tenant_id=old.tenant_id,
        admin_principal_id=old.admin_principal_id,
        expires_at=old.expires_at,
        rotated_from_id=old.id,
        # The successor is held to the same limits.
        rate_limits=old.rate_limits,
        max_in_flight=old.max_in_flight,
    )
    await record_event(
        session,
        actor,
        action="key.rotate",
        target_type="api_key",
        target_id=str(old.id),
        tenant_id=old.tenant_id,
        detail={
            "old_id": str(old.id),
            "old_prefix": old.display_prefix,
            "new_id": str(new.id),
            "new_prefix": new.display_prefix,
            "grace_seconds": grace_seconds,
            "old_revoked_at": ends_at.isoformat(),
        },
    )
    if old.tenant_id is not None:
        await emit(
            session,
            "key.rotated",
            {
                "key_id": str(old.id),
                "new_key_id": str(new.id),
                "name": old.name,
                "prefix": old.display_prefix,
                "new_prefix": new.display_prefix,
                "old_key_revoked_at": ends_at.isoformat(),
            },
            tenant_id=old.tenant_id,
        )
    return IssuedKey.issued(new, secret)


def _not_rotatable(key: ApiKey, now: datetime) -> str:
    """Why a key cannot be rotated (for the 409's detail)."""
    if key.revoked_at is not None and key.revoked_at <= now:
        return "this key is revoked; issue a new key instead"
    if key.revoked_at is not None:
        return (
            "this key was already rotated: it is revoked at "
            f"{key.revoked_at.isoformat()}; rotate its successor instead"
        )
    return "this key has expired; issue a new key instead"
