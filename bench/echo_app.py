"""The framework ceiling: a bare FastAPI app with one ``POST /echo`` route.

It validates the same ``PredictRequest`` as ``POST /api/v1/predict`` and returns a constant, with
no middleware, no authentication, no database and no model. Served by uvicorn with the same
settings as ``modelgate serve``, its throughput is what FastAPI + uvicorn can do on this machine;
every other figure in the benchmark is reported as a ratio of it.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from api.schemas.predict import PredictRequest

app = FastAPI(title="modelgate bench echo", openapi_url=None, docs_url=None, redoc_url=None)

_CONSTANT: dict[str, Any] = {"prediction": 0, "probability": 1.0, "class_name": "echo"}


@app.post("/echo")
async def echo(body: PredictRequest) -> dict[str, Any]:
    """Validate the request body and return a constant."""
    del body  # validated by FastAPI; nothing to compute
    return _CONSTANT


@app.get("/health")
async def health() -> dict[str, str]:
    """Readiness for the benchmark's startup poll."""
    return {"status": "ok"}
