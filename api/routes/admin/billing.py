"""The operator's billing export: one row per tenant, model, model version, day and plan, with
what it costs."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse
from sqlalchemy.ext.asyncio import AsyncSession

from api.http.deps import REPLICA_LAG_HEADER, ClosedMonthSessionDep, DatabaseRoute
from api.http.errors import problem_responses
from api.schemas.fields import BillingMonth
from auth.usage.ledger import BillingRow, billing_rows, parse_month

router = APIRouter(route_class=DatabaseRoute, tags=["admin"])

BILLING_COLUMNS = (
    "tenant_id",
    "tenant_name",
    "date",
    "model",
    "model_version",
    "requests",
    "units",
    "plan",
    "currency",
    "amount",
)
ExportFormat = Literal["csv", "jsonl"]


def _row_values(row: BillingRow) -> list[str | int]:
    return [
        str(row.tenant_id),
        row.tenant_name,
        row.date.isoformat(),
        row.model,
        row.model_version,
        row.requests,
        row.units,
        row.plan,
        row.currency,
        row.amount,
    ]


def _csv_line(values: list[str | int]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    # A tenant name starting with = + - @ would be a formula in a spreadsheet.
    writer.writerow(
        ["'" + v if isinstance(v, str) and v[:1] in ("=", "+", "-", "@") else v for v in values]
    )
    return buffer.getvalue()


async def billing_lines(session: AsyncSession, month: str, fmt: ExportFormat) -> AsyncIterator[str]:
    """The export as text lines (CSV with a header, or JSON Lines); shared with the CLI."""
    if fmt == "csv":
        yield _csv_line(list(BILLING_COLUMNS))
    async for row in billing_rows(session, month):
        values = _row_values(row)
        if fmt == "csv":
            yield _csv_line(values)
        else:
            yield json.dumps(dict(zip(BILLING_COLUMNS, values, strict=True))) + "\n"


@router.get(
    "/billing/export",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "The month's billing rows",
            "content": {"text/csv": {}, "application/jsonl": {}},
            "headers": {
                REPLICA_LAG_HEADER: {
                    "description": "Present when a closed month was read from the read "
                    "replica: how many seconds behind the primary it was (0: caught up); absent "
                    "when it was read from the primary (always for the current month)",
                    "schema": {"type": "number", "minimum": 0},
                }
            },
        },
        **problem_responses(401, 403, 422, 429, 503),
    },
)
async def export_billing(
    report: ClosedMonthSessionDep,
    month: Annotated[BillingMonth, Query()],
    format: Annotated[ExportFormat, Query()] = "csv",
) -> StreamingResponse:
    """Stream a month's billing rows (tenant, model, version, day, plan, amount) as CSV or JSONL."""
    parse_month(month)  # refuse a bad month with 422 before the stream starts
    media_type = "text/csv" if format == "csv" else "application/jsonl"
    return StreamingResponse(
        billing_lines(report.session, month, format),
        media_type=media_type,
        headers={
            "Content-Disposition": f'attachment; filename="billing-{month}.{format}"',
            **report.headers,
        },
    )
