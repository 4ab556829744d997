"""Realtime's reading of a `postgres_changes` binding: event, schema, table, filter, select."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

FILTER_OPS = (
    "eq",
    "neq",
    "lt",
    "lte",
    "gt",
    "gte",
    "in",
    "like",
    "ilike",
    "is",
    "match",
    "imatch",
    "isdistinct",
)


class ParamsError(Exception):
    """A binding Realtime cannot subscribe; the message is what its system message says."""


@dataclass(frozen=True)
class Filter:
    column: str
    op: str
    value: str
    negate: bool

    def as_row(self) -> list[Any]:
        return [self.column, self.op, self.value, self.negate]


@dataclass
class Binding:
    """One `postgres_changes` entry of a join, with the id Realtime derives from it."""

    params: dict[str, Any]
    id: int
    event: str
    schema: str
    table: str
    filters: list[Filter]
    select: list[str] | None
    error: str | None = None
    entities: set[tuple[str, str]] = field(default_factory=set)
    active: bool = False
    since: int = 0  # changes captured up to this id were committed before the subscription existed

    def wants(self, change_id: int, schema: str, table: str, type_: str) -> bool:
        return (
            self.active
            and change_id > self.since
            and (schema, table) in self.entities
            and self.event in ("*", type_)
        )


def binding_id(params: dict[str, Any]) -> int:
    """A stable id per distinct params, like Realtime's :erlang.phash2 (never 0: clients test it)."""
    canonical = repr(sorted((str(k), repr(v)) for k, v in params.items()))
    return zlib.crc32(canonical.encode()) % (2**27 - 1) + 1


def parse_binding(params: Any) -> Binding:
    """A binding as Realtime's parse_subscription_params reads it; parse errors are kept, not raised."""
    if not isinstance(params, dict):
        params = {}
    event = params.get("event")
    action = "*"
    if isinstance(event, str) and event.upper() in ("INSERT", "UPDATE", "DELETE"):
        action = event.upper()
    binding = Binding(
        params=params,
        id=binding_id(params),
        event=action,
        schema="public",
        table="*",
        filters=[],
        select=None,
    )
    try:
        schema, table, filters = _target(params)
        binding.schema, binding.table, binding.filters = schema, table, filters
        binding.select = _select(params, schema, table)
    except ParamsError as exc:
        binding.error = str(exc)
    return binding


def _target(params: dict[str, Any]) -> tuple[str, str, list[Filter]]:
    schema, table, filt = params.get("schema"), params.get("table"), params.get("filter")
    if isinstance(schema, str) and isinstance(table, str) and isinstance(filt, str):
        return schema, table, parse_filters(filt)
    if isinstance(schema, str) and isinstance(table, str) and "filter" not in params:
        return schema, table, []
    if isinstance(schema, str) and "table" not in params and "filter" not in params:
        return schema, "*", []
    if isinstance(table, str) and "schema" not in params and "filter" not in params:
        return "public", table, []
    raise ParamsError(
        "No subscription params provided. Please provide at least a `schema` or `table` to subscribe to: "
        + repr(params)
    )


def _select(params: dict[str, Any], schema: str, table: str) -> list[str] | None:
    cols = params.get("select")
    if cols is None:
        return None
    if isinstance(cols, str):
        raise ParamsError(
            "Error parsing `select` params: expected a list of column name strings,"
            ' e.g. select: ["col1", "col2"]'
        )
    names = [c for c in cols if isinstance(c, str)] if isinstance(cols, list) else []
    if names and (schema == "*" or table == "*"):
        raise ParamsError(
            "Column selection is not supported for wildcard subscriptions."
            " Provide an explicit schema and table name."
        )
    return names or None


def parse_filters(text: str) -> list[Filter]:
    """`col=op.value` segments joined by top-level commas (AND), each optionally `not.`-negated."""
    text = text.strip()
    if not text:
        return []
    filters = []
    for segment in _split_top_level(text):
        segment = segment.strip()
        if not segment:
            raise ParamsError("filter must not contain empty segments (check for extra commas)")
        column, eq, rest = segment.partition("=")
        negate = rest.startswith("not.")
        if negate:
            rest = rest[4:]
        op, dot, value = rest.partition(".")
        if not eq or not dot:
            raise ParamsError(f"Error parsing `filter` params: {[p for p in (column, rest) if p]!r}")
        if op not in FILTER_OPS:
            raise ParamsError(f"Error parsing `filter` params: {[op, value]!r}")
        filters.append(Filter(column, op, _format_value(op, value), negate))
    return filters


def _format_value(op: str, value: str) -> str:
    if op == "in":
        if len(value) >= 2 and value[0] == "(" and value[-1] == ")":
            return "{" + value[1:-1] + "}"
        raise ParamsError("Error parsing `filter` params: `in` filter value must be wrapped by parentheses")
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        inner, out, i = value[1:-1], [], 0
        while i < len(inner):
            if inner[i] == "\\" and i + 1 < len(inner):
                i += 1
            out.append(inner[i])
            i += 1
        return "".join(out)
    return value


def _split_top_level(text: str) -> list[str]:
    parts, current, depth, quoted, i = [], [], 0, False, 0
    while i < len(text):
        ch = text[i]
        if quoted:
            current.append(ch)
            if ch == "\\" and i + 1 < len(text):
                current.append(text[i + 1])
                i += 1
            elif ch == '"':
                quoted = False
        elif ch == '"' and (not current or current[-1] in ".(,"):
            quoted = True
            current.append(ch)
        elif ch == "(":
            depth += 1
            current.append(ch)
        elif ch == ")":
            depth = max(0, depth - 1)
            current.append(ch)
        elif ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    return parts
