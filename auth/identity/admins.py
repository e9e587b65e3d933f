"""Admin users: operators who log in with an e-mail address and a password.

An admin user is an ``AdminPrincipal`` whose ``name`` is its normalised e-mail address and which
has a ``password_hash`` (argon2, pwdlib's recommended parameters). Hashing and verification take
tens of milliseconds of CPU, so they run in a thread, never on the event loop; an unknown e-mail
address still costs one verification (against a dummy hash), so that the time a login takes does
not tell which addresses exist.
"""

from __future__ import annotations

import asyncio
import re
from functools import lru_cache

from pwdlib import PasswordHash
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from auth.audit import Actor, record_event
from auth.errors import Conflict, InvalidRequest, NotFound
from auth.identity.tokens import revoke_admin_user_tokens
from auth.models import AdminPrincipal, utcnow

MIN_PASSWORD_LENGTH = 12
# Bounded so that nobody can make the server hash a megabyte (argon2 reads all of it).
MAX_PASSWORD_LENGTH = 1024
MAX_EMAIL_LENGTH = 200  # the admin_principal.name column
_EMAIL = re.compile(r"^[^@\s\x00-\x1f\x7f]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9.-]{0,253})$")


@lru_cache(maxsize=1)
def _hasher() -> PasswordHash:
    return PasswordHash.recommended()


@lru_cache(maxsize=1)
def _dummy_hash() -> str:
    # A hash of a random string, computed once: an unknown account is verified against it.
    return _hasher().hash("modelgate dummy password for unknown accounts")


def normalize_email(email: str) -> str:
    """The stored form of an e-mail address (trimmed, lower case), or ``InvalidRequest``."""
    value = email.strip().lower()
    if len(value) > MAX_EMAIL_LENGTH or not _EMAIL.match(value):
        raise InvalidRequest("not a valid e-mail address", loc=("email",))
    return value


def check_password_policy(password: str) -> None:
    """At least 12 and at most 1024 characters."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise InvalidRequest(
            f"a password has at least {MIN_PASSWORD_LENGTH} characters", loc=("password",)
        )
    if len(password) > MAX_PASSWORD_LENGTH:
        raise InvalidRequest(
            f"a password has at most {MAX_PASSWORD_LENGTH} characters", loc=("password",)
        )


async def hash_password(password: str) -> str:
    """The argon2 hash of a password, computed in a thread."""
    return await asyncio.to_thread(_hasher().hash, password)


async def verify_password(password: str, password_hash: str) -> bool:
    """Whether the password matches the hash, checked in a thread; a malformed hash is a
    mismatch."""

    def verify() -> bool:
        try:
            return _hasher().verify(password, password_hash)
        except Exception:
            return False

    return await asyncio.to_thread(verify)


async def _user(session: AsyncSession, email: str) -> AdminPrincipal | None:
    return await session.scalar(select(AdminPrincipal).where(AdminPrincipal.name == email))


async def create_admin_user(
    session: AsyncSession, actor: Actor, email: str, password: str
) -> AdminPrincipal:
    """Create an admin user, audited as ``admin_user.create``; an existing principal of that
    name is a conflict."""
    address = normalize_email(email)
    check_password_policy(password)
    if await _user(session, address) is not None:
        raise Conflict("an admin with this e-mail address exists")
    admin = AdminPrincipal(
        name=address, password_hash=await hash_password(password), password_changed_at=utcnow()
    )
    session.add(admin)
    await session.flush()
    await record_event(
        session,
        actor,
        action="admin_user.create",
        target_type="admin_principal",
        target_id=str(admin.id),
        detail={"email": address},
    )
    return admin


async def set_password(session: AsyncSession, actor: Actor, email: str, password: str) -> int:
    """Set an admin user's password, audited as ``admin_user.password_change``; every token the
    user holds is revoked (it fails within a second on every worker). Returns how many tokens
    were revoked."""
    address = normalize_email(email)
    check_password_policy(password)
    admin = await _user(session, address)
    if admin is None:
        raise NotFound("no admin user with this e-mail address")
    admin.password_hash = await hash_password(password)
    admin.password_changed_at = utcnow()
    revoked = await revoke_admin_user_tokens(session, admin.id)
    await record_event(
        session,
        actor,
        action="admin_user.password_change",
        target_type="admin_principal",
        target_id=str(admin.id),
        detail={"email": address, "tokens_revoked": revoked},
    )
    return revoked


async def authenticate_password(
    session: AsyncSession, email: str, password: str
) -> AdminPrincipal | None:
    """The admin user with this e-mail address and password, or None. Always one
    verification, whether the address exists or not."""
    try:
        address = normalize_email(email)
    except InvalidRequest:
        address = None
    admin = await _user(session, address) if address is not None else None
    if len(password) > MAX_PASSWORD_LENGTH:
        return None
    stored = admin.password_hash if admin is not None else None
    # An unknown address is checked against a dummy hash (computed once, in a thread too).
    against = stored if stored is not None else await asyncio.to_thread(_dummy_hash)
    matches = await verify_password(password, against)
    if admin is None or stored is None or not matches:
        return None
    return admin
