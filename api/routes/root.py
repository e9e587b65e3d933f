"""The service's front door (``GET /``, outside the API prefix): its name, version and docs."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from api.console import DOCS_PATH
from api.http.errors import problem_responses

router = APIRouter(tags=["service"])


class ServiceInfo(BaseModel):
    """What this service is and where its documentation lives."""

    name: str
    version: str
    docs: str | None = Field(description="Path of the interactive API documentation")


@router.get("/", response_model=ServiceInfo, responses=problem_responses(500))
async def service_info(request: Request) -> ServiceInfo:
    """Name the service, its version and the path of its documentation."""
    app = request.app
    return ServiceInfo(name=app.title, version=app.version, docs=DOCS_PATH)
