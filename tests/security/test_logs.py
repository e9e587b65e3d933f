"""SECURITY.md line 20: logs never contain a credential, a digest or a request body."""

from __future__ import annotations

import logging

import httpx
import pytest
import structlog

from auth.identity.keys import generate_key, key_digest
from tests.conftest import Harness, bearer, create_admin_key, create_tenant_with_key, wrong_checksum


def _app_formatter() -> logging.Formatter:
    """The formatter of the handler the app installed (``api.logging.configure_logging``), so
    that the test reads each line as the app writes it, not only the record behind it."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler.formatter, structlog.stdlib.ProcessorFormatter):
            return handler.formatter
    raise AssertionError("the app's log handler is not installed on the root logger")


def _request_lines(records: list[logging.LogRecord]) -> dict[str, dict[str, object]]:
    """The app's own request log lines (logger ``modelgate.request``, event "request"), by
    request id."""
    lines = {}
    for record in records:
        event = record.msg
        is_dict = isinstance(event, dict)
        if record.name == "modelgate.request" and is_dict and event.get("event") == "request":
            lines[str(event["request_id"])] = event
    return lines


async def test_logs_carry_no_key_digest_or_body(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    tenant, key = await create_tenant_with_key(harness)
    admin = await create_admin_key(harness)
    unknown = generate_key()  # well formed: it is looked up in the database, by its digest
    forged = wrong_checksum(key)  # wrong checksum
    marker = [5.123456789, 3.987654321, 1.4, 0.2]
    pepper = harness.state.secrets.key_pepper
    predict = "/api/v1/predict"
    # The app logs at WARNING in the tests (make_settings): lower the root logger to DEBUG for
    # the block, so that every logger the app does not pin emits everything it would ever log.
    with caplog.at_level(logging.DEBUG):
        responses: list[tuple[httpx.Response, str, int]] = [
            (
                await harness.client.post(predict, json={"features": marker}, headers=bearer(key)),
                predict,
                200,
            ),
            (
                await harness.client.post(predict, json={"features": [1.0]}, headers=bearer(key)),
                predict,
                422,
            ),
            (
                await harness.client.post(
                    predict, json={"features": marker}, headers=bearer(forged)
                ),
                predict,
                401,
            ),
            (
                await harness.client.post(
                    predict, json={"features": marker}, headers=bearer(unknown)
                ),
                predict,
                401,
            ),
            (
                await harness.client.post(
                    "/api/v1/predict/batch",
                    json={"instances": [marker, marker]},
                    headers=bearer(key),
                ),
                "/api/v1/predict/batch",
                200,
            ),
        ]
        keys_path = f"/api/v1/admin/tenants/{tenant.id}/keys"
        issued = await harness.client.post(keys_path, json={"name": "new"}, headers=bearer(admin))
        responses.append((issued, keys_path, 201))
    new_key = issued.json()["key"]

    # First, the app really logged each request (and not only httpx its own lines), so the
    # search below reads what the app writes.
    lines = _request_lines(caplog.records)
    for response, path, status in responses:
        assert response.status_code == status, response.text
        line = lines.get(response.headers["X-Request-ID"])
        assert line is not None, f"no request log line for {path} {status}"
        assert (line["method"], line["path"], line["status"]) == ("POST", path, status)
    formatter = _app_formatter()
    text = "\n".join(
        f"{formatter.format(record)} {record.getMessage()} {record.__dict__}"
        for record in caplog.records
    )
    for secret in (key, new_key, unknown, forged, admin):
        assert secret not in text
        assert secret[:-1] not in text  # nor most of it
        assert key_digest(pepper, secret) not in text
    assert "5.123456789" not in text
    assert "3.987654321" not in text
