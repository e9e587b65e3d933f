"""Every response that can carry a secret (a new key, a token) is marked ``Cache-Control:
no-store`` (SECURITY.md line 12: a key's secret appears only in the response that created it, so
no cache on the way may keep a copy). The OpenAPI document names those routes: a new route that
returns a key or a token fails here until it is added with its own header test."""

from __future__ import annotations

from typing import Any

from tests.conftest import Harness

# The routes whose 2xx body carries a key or a token, each with a test of its no-store header:
# tests/api/test_error_shapes.py (admin issue), test_key_rotation.py, test_self_service_keys.py,
# test_tokens.py.
SECRET_BEARING = {
    "POST /api/v1/admin/tenants/{tenant_id}/keys",
    "POST /api/v1/admin/keys/{key_id}/rotate",
    "POST /api/v1/me/keys",
    "POST /api/v1/me/keys/{key_id}/rotate",
    "POST /api/v1/auth/token",
}
SECRET_FIELDS = {"key", "access_token"}


def _schema_fields(document: dict[str, Any], schema: dict[str, Any]) -> set[str]:
    """The names of a response schema's text properties (a secret is text; ``GET /me``'s
    ``key`` is an object describing the key), following references and combinations."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return _schema_fields(document, document["components"]["schemas"][name])
    fields = {
        name for name, prop in schema.get("properties", {}).items() if prop.get("type") == "string"
    }
    for combined in ("allOf", "anyOf", "oneOf"):
        for part in schema.get(combined, []):
            fields |= _schema_fields(document, part)
    return fields


async def test_the_routes_that_return_secrets_are_exactly_the_no_store_ones(
    harness: Harness,
) -> None:
    document = (await harness.client.get("/openapi.json")).json()
    bearing = set()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, response in operation.get("responses", {}).items():
                if not status.startswith("2"):
                    continue
                for content in response.get("content", {}).values():
                    if _schema_fields(document, content.get("schema", {})) & SECRET_FIELDS:
                        bearing.add(f"{method.upper()} {path}")
    assert bearing == SECRET_BEARING
