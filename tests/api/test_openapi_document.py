"""Every route documents itself: a one-line description, a response model, its errors."""

from __future__ import annotations

from pathlib import Path

from api.app import create_app
from auth.settings import Settings

PUBLIC = {"/", "/api/v1/health", "/api/v1/health/live", "/api/v1/health/ready"}


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
