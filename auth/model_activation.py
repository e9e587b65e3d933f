"""Which version of each model is active: set by an operator (HTTP or CLI), audited, and read
by every worker about once a second (api.server.activations), so that an activation or a rollback
reaches every worker within 2 seconds. The model registry is read-only for the API; this table
is where the choice lives."""

from __future__ import annotations

import re
from datetime import datetime

from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from auth.audit import Actor, record_event
from auth.errors import InvalidRequest
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
    row = await session.get(ModelActivation, name, with_for_update=True)
    previous = None if row is None else row.version
    now = utcnow()
    if row is None:
        row = ModelActivation(name=name, version=version, activated_at=now, activated_by=actor.name)
        session.add(row)
    else:
        row.version, row.activated_at, row.activated_by = version, now, actor.name
    await record_event(
        session,
        actor,
        action="model.activate",
        target_type="model",
        target_id=name,
        detail={"version": version, "previous_version": previous},
    )
    return ActivationView(
        name=name,
        version=version,
        previous_version=previous,
        activated_at=now,
        activated_by=actor.name,
    )


async def active_versions(session: AsyncSession) -> dict[str, str]:
    """Every recorded activation: model name -> version (one small query)."""
    rows = await session.execute(select(ModelActivation.name, ModelActivation.version))
    return {row.name: row.version for row in rows}
