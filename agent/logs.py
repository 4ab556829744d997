"""Log setup: loguru to stderr, human-readable or JSON lines, bound fields shown short."""

from __future__ import annotations

import logging
import sys
from typing import Any

from loguru import logger

from agent.domain.redact import cap_record, log_line

# A field is a hint for a person or a filter for a machine; a whole error text or a dict of every
# dataset count belongs in the row or an artifact. Longer values are cut in the middle.
FIELD_LIMIT = 80
JSON_FIELD_LIMIT = 500

_TEXT = (
    "<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
    "<level>{message}</level> <dim>{extra[_fields]}</dim>\n{exception}"
)


def short(value: object, limit: int = FIELD_LIMIT) -> str:
    """`value` as text of at most `limit` characters."""
    text = value if isinstance(value, str) else repr(value) if isinstance(value, (dict, list)) else str(value)
    text = text.replace("\n", "⏎")
    if len(text) <= limit:
        return text
    # Cut in the middle: a path's or URL's end (the file name) says as much as its start.
    head = limit // 2
    return text[:head] + "…" + text[len(text) - (limit - head - 1) :]


def _cap(value: Any, limit: int) -> Any:
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    return short(value, limit)


def _text_format(record: Any) -> str:
    extra = record["extra"]
    # Substituted into the template, so a value is never read as colour markup or a format field.
    extra["_fields"] = " ".join(f"{k}={short(v)}" for k, v in extra.items() if not k.startswith("_"))
    return _TEXT


def _json_format(record: Any) -> str:
    extra = record["extra"]
    for key, value in extra.items():
        extra[key] = _cap(value, JSON_FIELD_LIMIT)
    return "{message}\n"


def _stderr(message: str) -> None:
    sys.stderr.write(log_line(message))
    sys.stderr.flush()


class _ToLoguru(logging.Handler):
    """Libraries' stdlib warnings (realtime, httpx, …) go through the same capping and redaction."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            message = str(record.msg)
        logger.bind(source=record.name).opt(exception=record.exc_info).log(level, message)


def setup(level: str = "INFO", json: bool = False) -> None:
    logger.remove()
    # Every record is capped field by field, and every line redacted as it goes out: no
    # secret reaches a log. diagnose=False: a traceback never prints local variables (settings).
    logger.configure(patcher=cap_record)  # type: ignore[arg-type]
    if json:
        logger.add(
            _stderr,
            level=level.upper(),
            format=_json_format,
            serialize=True,
            enqueue=False,
            diagnose=False,
            backtrace=False,
        )
    else:
        logger.add(
            _stderr,
            level=level.upper(),
            format=_text_format,
            colorize=sys.stderr.isatty(),
            diagnose=False,
            backtrace=False,
        )
    logging.basicConfig(handlers=[_ToLoguru()], level=logging.WARNING, force=True)
