"""Every route documents itself: a one-line description, a response model, its errors."""

from __future__ import annotations

from pathlib import Path

from api.app import create_app
from auth.settings import Settings

PUBLIC = {
    "/",
    "/api/v1/health",
    "/api/v1/health/live",
    "/api/v1/health/ready",
    "/api/v1/auth/token",
    # The Open Inference Protocol's server health, public as /api/v1/health/* are.
    "/v2",
    "/v2/health/live",
    "/v2/health/ready",
    # Public unless MODELGATE_METRICS_TOKEN is set (its 401 is documented).
    "/metrics",
    # Authenticated by the delivery's signature, not a bearer credential (their 401 is
    # documented).
    "/api/v1/admin/models/webhooks/mlflow",
    "/api/v1/admin/models/webhooks/generic",
}


def test_every_route_has_a_description_and_documented_errors(tmp_path: Path) -> None:
    spec = create_app(Settings(_env_file=None, var_dir=tmp_path)).openapi()  # type: ignore[call-arg]
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            where = f"{method.upper()} {path}"
            description = operation.get("description", "")
            assert description, where
            assert "\n" not in description.strip(), where
            success = [code for code in operation["responses"] if code.startswith("2")]
            assert success, where
            if path not in PUBLIC:
                assert "401" in operation["responses"], where
                assert operation.get("security"), where


def test_every_error_response_is_documented_as_problem_json(tmp_path: Path) -> None:
    """What the fuzzer checks at run time, checked on the document itself."""
    spec = create_app(Settings(_env_file=None, var_dir=tmp_path)).openapi()  # type: ignore[call-arg]
    schemas = spec["components"]["schemas"]
    assert {"Problem", "ValidationProblem"} <= set(schemas)
    assert "HTTPValidationError" not in schemas
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            where = f"{method.upper()} {path}"
            responses = operation["responses"]
            for code, response in responses.items():
                if int(code) >= 400:
                    assert list(response["content"]) == ["application/problem+json"], where
            if operation.get("security"):
                assert {"401", "403", "429", "503"} <= set(responses), where
            if "requestBody" in operation:
                assert {"413", "422"} <= set(responses), where
                ref = responses["422"]["content"]["application/problem+json"]["schema"]["$ref"]
                assert ref.endswith("/ValidationProblem"), where
