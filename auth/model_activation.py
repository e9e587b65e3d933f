"""Which version of each model is active: set by an operator (HTTP or CLI), audited, and read
by every worker about once a second (api.server.activations), so that an activation or a rollback
reaches every worker within 2 seconds. The model registry is read-only for the API; this table
is where the choice lives."""

from __future__ import annotations

import re
from datetime import datetime

from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from auth.audit import Actor, record_event
from auth.errors import InvalidRequest
from auth.events.outbox import emit
from auth.models import ModelActivation, utcnow

# The model registry's own patterns (ml.manifest.NAME_PATTERN and VERSION_PATTERN; auth does
# not import ml, and a test proves they are the same).
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
MODEL_VERSION_PATTERN = r"^[1-9][0-9]{0,8}$"


class ActivationView(BaseModel):
    """A model's active version, who activated it and when, and the version it replaced."""

    name: str
    version: str
    previous_version: str | None
    activated_at: datetime
    activated_by: str


async def activate_version(
    session: AsyncSession, actor: Actor, name: str, version: str
) -> ActivationView:
    """Record ``version`` as ``name``'s active version, with its audit event (``model.activate``,
    in the same transaction). The caller has checked that the version loads and serves; this
    only records the choice. 422 for an invalid name or version."""
    if not re.fullmatch(MODEL_NAME_PATTERN, name):
        raise InvalidRequest("invalid model name", loc=("path", "name"))
    if not re.fullmatch(MODEL_VERSION_PATTERN, version):
        raise InvalidRequest("version must be a number from 1 to 999999999", loc=("version",))
    now = utcnow()
    # The model's first activation inserts its row; a concurrent first activation waits for
    # that insert to commit (the unique name) and then does nothing, instead of failing on the
    # name with a 409: no row exists yet that a SELECT ... FOR UPDATE could lock, so locking
    # alone would let both insert. Then every activation, first or not, locks the row and
    # reads the version it replaces: concurrent activations apply in turn, the last one wins.
    dialect = session.get_bind().dialect.name
    insert = postgresql_insert if dialect == "postgresql" else sqlite_insert
    inserted = await session.execute(
        insert(ModelActivation)
        .values(name=name, version=version, activated_at=now, activated_by=actor.name)
        .on_conflict_do_nothing(index_elements=[ModelActivation.name])
    )
    if inserted.rowcount == 1:  # type: ignore[attr-defined]
        previous = None
    else:
        row = await session.get(ModelActivation, name, with_for_update=True, populate_existing=True)
        if row is None:  # the row is never deleted; a conflict means it exists
            raise RuntimeError(f"no activation row for {name!r} after a conflict on it")
        previous = row.version
        row.version, row.activated_at, row.activated_by = version, now, actor.name
    await record_event(
        session,
        actor,
        action="model.activate",
        target_type="model",
        target_id=name,
        detail={"version": version, "previous_version": previous},
    )
    await emit(
        session,
        "model.activated",
        {"model": name, "version": version, "previous_version": previous},
    )
    return ActivationView(
        name=name,
        version=version,
        previous_version=previous,
        activated_at=now,
        activated_by=actor.name,
    )


async def record_pull(
    session: AsyncSession, actor: Actor, name: str, detail: dict[str, object]
) -> None:
    """The audit event of a version pulled from a source (``model.pull``): the version, the
    source without credentials, the artifact's kind and SHA-256, and whether it was unpickled
    (only with the operator's explicit consent)."""
    await record_event(
        session, actor, action="model.pull", target_type="model", target_id=name, detail=detail
    )


async def active_versions(session: AsyncSession) -> dict[str, str]:
    """Every recorded activation: model name -> version (one small query)."""
    rows = await session.execute(select(ModelActivation.name, ModelActivation.version))
    return {row.name: row.version for row in rows}
