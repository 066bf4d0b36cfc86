"""structlog configuration, in one place (STYLE.md rule 9).

Every module does ``log = structlog.get_logger()`` and logs snake_case facts with
fields. The process entry point calls ``configure_logging`` once, before the first log
call: structlog caches a logger on first use, so a later configure would not reach it.

Output goes to stdout: one JSON object per line when stdout is not a terminal (systemd
sends it to journald, a test or a log shipper reads it), or coloured key=value lines on
a terminal. ``log_format`` forces one or the other.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, Final, Literal, TextIO

import structlog

LogFormat = Literal["auto", "json", "console"]

LEVELS: Final = ("debug", "info", "warning", "error", "critical")


def _dumps(event: Any, **kwargs: Any) -> str:
    # default=str: a field that is not JSON (bytes, an enum, a tuple address) is
    # still logged rather than crashing the log call.
    return json.dumps(event, default=str, separators=(",", ":"))


def configure_logging(
    level: str = "info", log_format: LogFormat = "auto", stream: TextIO | None = None
) -> None:
    """Configure structlog (and the stdlib loggers of our dependencies)."""
    if level.lower() not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {level!r}")
    numeric = getattr(logging, level.upper())
    out = stream or sys.stdout
    as_json = log_format == "json" or (log_format == "auto" and not out.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer(serializer=_dumps)
        if as_json
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if as_json:
        processors.append(structlog.processors.dict_tracebacks)
    processors.append(renderer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=True,
    )
    # aiohttp and asyncio log through the stdlib: send them to stderr at our level,
    # and keep aiohttp's per-request access log quiet (aiohttp#2779: it is costly).
    logging.basicConfig(stream=sys.stderr, level=max(numeric, logging.INFO), force=True)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
