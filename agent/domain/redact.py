"""Secrets out, sizes capped: the one place that decides what a log line, a print or a message may carry.

Every log record (agent/logs.py), every line the CLI prints and every `error_message` goes
through here. `redact` masks URL passwords (`user:***@host`), signed-URL tokens (`token=***`)
and every secret registered at start (the service-role key, AGENT_SECRET, the database
password), wherever they appear, even inside a URL too malformed to parse.
"""

from __future__ import annotations

import re
import threading
from typing import Any

MASK = "***"
MAX_VALUE_CHARS = 200  # an offending value quoted in a message
MAX_MESSAGE_CHARS = 2000  # an error_message as a whole
MAX_LOG_FIELD_CHARS = 2000  # one log field (the message, or one bound value)
_MIN_SECRET_CHARS = 4  # shorter ones would mask ordinary words

# `scheme://user:password@host`, and the same without a scheme as a malformed URL leaves it.
_USERINFO = re.compile(r"(?P<user>[A-Za-z0-9._%+\-~!$&'()*,;=]+):(?P<password>[^\s@/:'\"]+)@")
# Signed-URL and API tokens in query strings, and `password=` in key=value connection strings.
_QUERY_SECRET = re.compile(
    r"(?P<key>(?<![A-Za-z0-9_])(?:token|access_token|apikey|api_key|key|signature|sig|password|secret)=)(?P<value>[^&\s'\"]+)",
    re.IGNORECASE,
)
# Bearer tokens and JWTs (service-role and anon keys are JWTs).
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]+")
# Python traceback lines: never part of a message the web app shows.
_FRAME = re.compile(r"^\s*(Traceback \(most recent call last\):|File \".*\", line \d+)")

_secrets: set[str] = set()
_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """Mask `value` wherever it appears from now on (settings call this for each secret)."""
    if value and len(value) >= _MIN_SECRET_CHARS:
        with _lock:
            _secrets.add(value)


def url_password(url: str | None) -> str | None:
    """The password part of a URL or connection string, even a malformed one; None when absent."""
    if not url:
        return None
    match = _USERINFO.search(url)
    if match:
        return match.group("password")
    match = re.search(r"password=([^\s&'\"]+)", url, re.IGNORECASE)
    return match.group(1) if match else None


def redact(text: str) -> str:
    """`text` with URL passwords, token query parameters, JWTs and registered secrets masked."""
    if not text:
        return text
    with _lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    text = _USERINFO.sub(lambda m: f"{m.group('user')}:{MASK}@", text)
    text = _QUERY_SECRET.sub(lambda m: f"{m.group('key')}{MASK}", text)
    return _JWT.sub(MASK, text)


def truncate(text: str, limit: int) -> str:
    """At most `limit` characters, an ellipsis marking a cut."""
    return text if len(text) <= limit else text[: max(0, limit - 1)] + "…"


def quote(value: object, limit: int = MAX_VALUE_CHARS) -> str:
    """An offending value for a message: repr'd, redacted, at most `limit` characters."""
    if isinstance(value, str):
        # Cut before repr so that a huge string is never copied whole.
        text = repr(value[: limit + 1])
    elif isinstance(value, (dict, list, tuple)):
        text = f"<{type(value).__name__} of {len(value)} items>"
    elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        text = f"<integer of about {int(value.bit_length() * 0.30103)} digits>"
    else:
        text = repr(value)
    return truncate(redact(text), limit)


def error_message(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """A message fit for `error_message`: redacted, no traceback frames, one line, capped."""
    lines = [line.strip() for line in text[: limit * 4].splitlines()]
    kept = [line for line in lines if line and not _FRAME.match(line)]
    return truncate(redact(" ".join(kept)), limit)


def log_field(value: str, limit: int = MAX_LOG_FIELD_CHARS) -> str:
    """One log field: capped, then redacted."""
    return redact(truncate(value, limit))


_MAX_LOG_LINE_CHARS = 64 * 1024  # one whole formatted record, exception text included


def cap_record(record: dict[str, Any]) -> None:
    """Loguru patcher: cap the message and every bound field before anything formats them."""
    record["message"] = log_field(str(record["message"]))
    extra = record["extra"]
    for key, value in list(extra.items()):
        if isinstance(value, str):
            extra[key] = log_field(value)
        elif isinstance(value, (dict, list, tuple, set, bytes)):
            text = repr(value)
            if len(text) > MAX_LOG_FIELD_CHARS or redact(text) != text:
                extra[key] = log_field(text)


def log_line(text: str) -> str:
    """A whole formatted log line as it goes out: capped, redacted, newline kept."""
    if len(text) > _MAX_LOG_LINE_CHARS:
        text = text[:_MAX_LOG_LINE_CHARS] + " …(cut)\n"
    return redact(text)
