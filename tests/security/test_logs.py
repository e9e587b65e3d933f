"""SECURITY.md line 20: logs never contain a credential, a digest or a request body."""

from __future__ import annotations

import logging

import pytest

from auth.keys import key_digest
from tests.conftest import Harness, bearer, create_tenant_with_key


async def test_logs_carry_no_key_digest_or_body(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    _, key = await create_tenant_with_key(harness)
    marker = [5.123456789, 3.987654321, 1.4, 0.2]
    with caplog.at_level(logging.DEBUG):
        await harness.client.post("/api/v1/predict", json={"features": marker}, headers=bearer(key))
        await harness.client.post("/api/v1/predict", json={"features": [1.0]}, headers=bearer(key))
        await harness.client.post(
            "/api/v1/predict", json={"features": marker}, headers=bearer(key[:-1] + "x")
        )
    text = "\n".join(f"{record.getMessage()} {record.__dict__}" for record in caplog.records)
    assert caplog.records, "expected request log lines"
    assert key not in text
    assert key[:-1] not in text
    assert key_digest(harness.state.secrets.key_pepper, key) not in text
    assert "5.123456789" not in text
