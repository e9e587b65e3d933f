"""Operator routes; the whole router requires the ``admin`` scope."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from api.http.deps import require_admin
from api.routes import events
from api.routes.admin import activation, audit, billing, plans, pull, tenants, tokens, usage

router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])
router.include_router(tenants.router)
router.include_router(plans.router)
router.include_router(billing.router)
router.include_router(audit.router)
router.include_router(usage.router)
router.include_router(tokens.router)
router.include_router(activation.router)
router.include_router(pull.router)
router.include_router(events.admin_router)
