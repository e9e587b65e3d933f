"""structlog logs: JSON lines (the default), or structlog's console renderer for development
(``MODELGATE_LOG_FORMAT=console``). Request-scoped fields (request_id, tenant_id, key_id) are bound
through contextvars; credentials, digests and request bodies are never logged."""

from __future__ import annotations

import logging
import os
import sys
from typing import Literal, TextIO

import structlog
from opentelemetry import trace

SQL_PARAMETER_LOGGERS = ("aiosqlite", "asyncpg", "sqlalchemy.engine", "sqlalchemy.pool")


def _add_process_id(
    _logger: object, _method: str, event_dict: structlog.types.EventDict
) -> structlog.types.EventDict:
    # With several workers, which process answered is part of every story a log tells.
    event_dict["pid"] = os.getpid()
    return event_dict


# Whether lines name their trace (traces on). A flag read by the processor rather than a
# processor added or not: loggers already used keep the processors they were first used with.
_trace_ids = False


def _add_trace_ids(
    _logger: object, _method: str, event_dict: structlog.types.EventDict
) -> structlog.types.EventDict:
    # With traces on, a line logged inside a traced request names its trace and span: from a
    # log line to its trace, and back.
    if not _trace_ids:
        return event_dict
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event_dict.setdefault("trace_id", format(context.trace_id, "032x"))
        event_dict.setdefault("span_id", format(context.span_id, "016x"))
    return event_dict


class _ModelgateHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The app's handler on stderr; a class of its own so that it can be found again."""


LogFormat = Literal["json", "console"]


def _renderer(log_format: LogFormat, colors: bool) -> list[structlog.types.Processor]:
    """The last processors of every record: how a line is written."""
    if log_format == "console":
        # Plain tracebacks: the default (rich's, when installed) prints each frame's local
        # variables, and a local can be a credential.
        return [
            structlog.dev.ConsoleRenderer(
                colors=colors, exception_formatter=structlog.dev.plain_traceback
            )
        ]
    return [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]


def configure_logging(
    level: str = "INFO",
    log_format: LogFormat = "json",
    stream: TextIO | None = None,
    *,
    trace_ids: bool = False,
) -> None:
    """Route stdlib and structlog records through one renderer (JSON or console) on ``stream``
    (stderr). With ``trace_ids`` (traces on), lines logged inside a span carry its ids."""
    global _trace_ids
    _trace_ids = trace_ids
    stream = stream or sys.stderr
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        _add_process_id,
        _add_trace_ids,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        # Filter first: a disabled level then costs one check, not the whole processor chain.
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *_renderer(log_format, colors=stream.isatty()),
        ],
    )
    handler = _ModelgateHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    # Replace our own handler (the app may be built more than once in a process), and leave
    # handlers others installed (a test's log capture) alone.
    root.handlers[:] = [h for h in root.handlers if not isinstance(h, _ModelgateHandler)]
    root.addHandler(handler)
    root.setLevel(level.upper())
    # uvicorn's access log would duplicate our request log line (and shows query strings).
    logging.getLogger("uvicorn.access").disabled = True
    # These log SQL with its parameters at DEBUG, and a parameter can be a key's digest:
    # they never log below WARNING, whatever the configured level.
    for name in SQL_PARAMETER_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
