"""Decoding a row's JSON without letting its shape hurt the agent.

A row is untrusted input: anyone holding the web app's public key can write one. The stores
decode `configuration` and `results` with `load_json`, which never raises: JSON that is too big,
too deep, has too many keys, too long a string or an unreadable number comes back as
`Unreadable`, and the run that carries it fails with that reason instead of the store (or the
dispatcher that called it) crashing on a RecursionError or a 400-digit integer.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

MAX_JSON_BYTES = 64 * 1024
MAX_JSON_DEPTH = 32
MAX_JSON_ITEMS = 2_000  # keys and array items, all levels together
MAX_STRING_CHARS = 4_096  # any one string (a key or a value)
_MAX_INT_DIGITS = 30  # beyond this an integer is read as infinite, then refused by range checks


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A JSON value the agent refused to read, and why."""

    reason: str


def _bounded_int(text: str) -> int | float:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        return -math.inf if text.startswith("-") else math.inf
    return int(text)


def load_json(raw: str | bytes | bytearray | memoryview) -> object:
    """Decode untrusted JSON; Unreadable (never an exception) when it is over a limit or invalid."""
    size = len(raw) if isinstance(raw, str) else memoryview(raw).nbytes
    if size > MAX_JSON_BYTES:
        return Unreadable(f"is {size} bytes of JSON, more than the {MAX_JSON_BYTES} allowed")
    if isinstance(raw, memoryview):
        raw = raw.tobytes()
    try:
        value = json.loads(raw, parse_int=_bounded_int)
    except RecursionError:
        return Unreadable(f"is nested more than {MAX_JSON_DEPTH} levels deep")
    except json.JSONDecodeError as exc:
        return Unreadable(f"is not valid JSON ({exc.msg})")
    except (ValueError, TypeError, OverflowError, MemoryError) as exc:
        return Unreadable(f"is not readable JSON ({type(exc).__name__})")
    problem = json_problem(value)
    return Unreadable(problem) if problem else value


def json_problem(value: object) -> str | None:
    """Why a decoded JSON value is over the limits; None when it is within them. Iterative."""
    items = 0
    stack: list[tuple[object, int, str]] = [(value, 0, "")]
    while stack:
        node, depth, path = stack.pop()
        at = f" (at {path[:80]})" if path else ""
        if depth > MAX_JSON_DEPTH:
            return f"is nested more than {MAX_JSON_DEPTH} levels deep"
        if isinstance(node, int) and not isinstance(node, bool) and node.bit_length() > 128:
            return f"holds a number too large to read{at}"
        if isinstance(node, str):
            if len(node) > MAX_STRING_CHARS:
                return (
                    f"holds a string of {len(node)} characters{at}, more than the {MAX_STRING_CHARS} allowed"
                )
        elif isinstance(node, dict):
            items += len(node)
            for key, child in node.items():
                name = str(key)
                if len(name) > MAX_STRING_CHARS:
                    return f"holds a key of {len(name)} characters, more than the {MAX_STRING_CHARS} allowed"
                stack.append((child, depth + 1, f"{path}.{name}" if path else name))
        elif isinstance(node, (list, tuple)):
            items += len(node)
            stack.extend((child, depth + 1, f"{path}[{i}]") for i, child in enumerate(node))
        if items > MAX_JSON_ITEMS:
            return f"has more than {MAX_JSON_ITEMS} keys and items"
    return None
