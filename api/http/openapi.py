"""The OpenAPI document, made to say what the app really answers.

FastAPI documents every error response under ``application/json`` and adds a 422 of its own
shape; every error here is problem JSON, and some answers come from layers it cannot see (the
credential check's 401/403/429/503, the body limit's 413). Routes declare what is particular
to them (``problem_responses``); this fills in the rest, the same way for every route.

A route that reads its own body (the V2 infer routes: JSON or binary tensor data) describes it in
its ``openapi_extra``, with the schemas that description refers to under ``x-schemas``: they are
moved to the document's components here.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from api.http.errors import PROBLEM_DESCRIPTIONS, Problem, ValidationProblem
from api.http.problems import PROBLEM_MEDIA_TYPE

# What any route behind a credential may answer: no or a bad credential, a missing scope or
# a suspended tenant, the key's rate limit, a dependency of the check (Redis, the database)
# being down.
CREDENTIAL_ERRORS = (401, 403, 429, 503)
_PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
_VALIDATION_REF = {"$ref": "#/components/schemas/ValidationProblem"}


def _complete(operation: dict[str, Any]) -> None:
    responses: dict[str, Any] = operation["responses"]
    statuses: set[int] = set()
    if operation.get("security"):
        statuses.update(CREDENTIAL_ERRORS)
    if operation.get("parameters") or "requestBody" in operation:
        statuses.add(422)  # anything the client sends can fail validation
    if "requestBody" in operation:
        statuses.add(413)  # the body limit applies to every body
    for status in statuses:
        # Its content is filled below, as every error response's is.
        responses.setdefault(str(status), {"description": PROBLEM_DESCRIPTIONS[status]})
    for code, response in responses.items():
        if int(code) < 400:
            continue
        content: dict[str, Any] = response.setdefault("content", {})
        # FastAPI files the route's model (or its own 422 shape) under application/json; errors
        # are only ever sent as problem JSON.
        schema = content.pop("application/json", {}).get("schema", {})
        if code == "422":
            schema = _VALIDATION_REF
        elif not schema.get("$ref"):
            schema = _PROBLEM_REF
        content[PROBLEM_MEDIA_TYPE] = {"schema": schema}


def install_openapi(app: FastAPI) -> None:
    """Replace the app's OpenAPI generator with one that documents every problem response."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                description=app.description,
                routes=app.routes,
            )
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            for operations in document.get("paths", {}).values():
                for operation in operations.values():
                    _complete(operation)
                    schemas.update(operation.pop("x-schemas", {}))
            _add_problem_schemas(schemas)
            for unused in ("HTTPValidationError", "ValidationError"):
                schemas.pop(unused, None)
            app.openapi_schema = document
        return app.openapi_schema

    setattr(app, "openapi", openapi)  # noqa: B010 (FastAPI's documented way to replace it)


def _add_problem_schemas(schemas: dict[str, Any]) -> None:
    for model in (Problem, ValidationProblem):
        schemas.setdefault(
            model.__name__, model.model_json_schema(ref_template="#/components/schemas/{model}")
        )
