"""PostgREST's URL grammar: `select`, filters, `or`/`and` trees, `order`, turned into SQL fragments."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from psycopg import sql

OPERATORS = {
    "eq": "=",
    "neq": "<>",
    "gt": ">",
    "gte": ">=",
    "lt": "<",
    "lte": "<=",
    "like": "like",
    "ilike": "ilike",
    "match": "~",
    "imatch": "~*",
    "isdistinct": "is distinct from",
    "cs": "@>",
    "cd": "<@",
    "ov": "&&",
}
IS_VALUES = {"null": "null", "not_null": "not null", "true": "true", "false": "false", "unknown": "unknown"}
# Query parameters that are not filters (`apikey` is the gateway's, never a column).
RESERVED = {"select", "order", "limit", "offset", "columns", "on_conflict", "apikey"}
LOGIC_KEYS = {"or", "and", "not.or", "not.and"}
_CAST = re.compile(r"^[A-Za-z_][A-Za-z0-9_ ]*(\[\])?$")


class RestError(Exception):
    """An error PostgREST answers with {code, details, hint, message} and an HTTP status."""

    def __init__(
        self, status: int, code: str, message: str, details: str | None = None, hint: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.hint = hint

    def body(self) -> dict[str, str | None]:
        return {"code": self.code, "details": self.details, "hint": self.hint, "message": self.message}


def parse_error(what: str, details: str) -> RestError:
    return RestError(400, "PGRST100", f'"failed to parse {what}"', details)


@dataclass(frozen=True)
class Field:
    """A column, optionally followed by JSON arrows: `data->a->>b`."""

    name: str
    path: tuple[tuple[str, str], ...] = ()

    def sql(self, relation: str) -> sql.Composable:
        expr: sql.Composable = sql.Identifier(relation, self.name)
        for arrow, key in self.path:
            target: sql.Composable = sql.SQL(key) if key.lstrip("-").isdigit() else sql.Literal(key)
            expr = sql.SQL("({} {} {})").format(expr, sql.SQL(arrow), target)
        return expr

    @property
    def default_alias(self) -> str:
        return self.path[-1][1] if self.path else self.name


@dataclass(frozen=True)
class SelectItem:
    field: Field | None  # None is `*`
    alias: str | None = None
    cast: str | None = None


@dataclass(frozen=True)
class Condition:
    field: Field
    op: str
    value: str | list[str]
    negate: bool = False


@dataclass(frozen=True)
class Logic:
    op: str  # "and" | "or"
    items: tuple[Condition | Logic, ...]
    negate: bool = False


@dataclass(frozen=True)
class OrderTerm:
    field: Field
    desc: bool = False
    nulls: str | None = None  # "first" | "last"


@dataclass
class Query:
    """What a request's query string asks for."""

    select: list[SelectItem] = field(default_factory=lambda: [SelectItem(None)])
    filters: list[Condition | Logic] = field(default_factory=list)
    order: list[OrderTerm] = field(default_factory=list)
    limit: int | None = None
    offset: int = 0

    @property
    def has_filters(self) -> bool:
        return bool(self.filters)


def parse_query(params: list[tuple[str, str]], *, filters_allowed: bool = True) -> Query:
    """The parts of a query string PostgREST reads for a table or a function's result."""
    query = Query()
    for key, value in params:
        if key == "select":
            query.select = parse_select(value)
        elif key == "order":
            query.order = parse_order(value)
        elif key == "limit":
            query.limit = _non_negative(key, value)
        elif key == "offset":
            query.offset = _non_negative(key, value)
        elif key in RESERVED:
            continue
        elif key in LOGIC_KEYS:
            negate = key.startswith("not.")
            query.filters.append(parse_logic(key.removeprefix("not."), value, negate))
        elif "." in key and key.rsplit(".", 1)[1] in ("or", "and", "order", "limit", "offset", "select"):
            raise RestError(400, "PGRST108", "Embedded resources are not supported by the stand-in", key)
        elif filters_allowed:
            query.filters.append(parse_condition(parse_field(key), value))
    return query


def _non_negative(key: str, value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise parse_error(key, f'unexpected "{value[:1]}" expecting digit') from None
    if n < 0:
        raise parse_error(key, "negative value")
    return n


def parse_field(text: str) -> Field:
    parts = re.split(r"(->>|->)", text.strip())
    name = _unquote_ident(parts[0])
    if not name:
        raise parse_error("column", f"empty column name in {text!r}")
    path = tuple((parts[i], _unquote_ident(parts[i + 1])) for i in range(1, len(parts) - 1, 2))
    return Field(name, path)


def _unquote_ident(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        return text[1:-1].replace('""', '"')
    return text


def parse_select(text: str) -> list[SelectItem]:
    items = []
    for raw in split_top_level(text):
        raw = raw.strip()
        if not raw:
            continue
        if "(" in raw:
            name = raw.split("(", 1)[0]
            raise RestError(
                400,
                "PGRST200",
                f"Could not find a relationship for '{name}' in the schema cache",
                "Embedded resources are not supported by the stand-in",
            )
        if raw == "*":
            items.append(SelectItem(None))
            continue
        alias = None
        if ":" in raw and not raw.startswith('"'):
            head, _, rest = raw.partition(":")
            if not rest.startswith(":"):
                alias, raw = _unquote_ident(head), rest
        cast = None
        if "::" in raw:
            raw, _, cast = raw.partition("::")
            if not _CAST.match(cast):
                raise parse_error("select", f"invalid cast {cast!r}")
        items.append(SelectItem(parse_field(raw), alias, cast))
    return items or [SelectItem(None)]


def parse_order(text: str) -> list[OrderTerm]:
    terms = []
    for raw in split_top_level(text):
        if not raw.strip():
            continue
        parts = raw.strip().split(".")
        fld, mods = parse_field(parts[0]), parts[1:]
        desc, nulls = False, None
        for mod in mods:
            if mod in ("asc", "desc"):
                desc = mod == "desc"
            elif mod in ("nullsfirst", "nullslast"):
                nulls = mod.removeprefix("nulls")
            else:
                raise parse_error(
                    f"order ({raw})", f'unexpected "{mod}" expecting "asc", "desc", "nullsfirst"'
                )
        terms.append(OrderTerm(fld, desc, nulls))
    return terms


def parse_condition(fld: Field, text: str, *, in_tree: bool = False) -> Condition:
    """`op.value` or `not.op.value` for a column."""
    negate = text.startswith("not.")
    if negate:
        text = text[4:]
    op, dot, value = text.partition(".")
    if not dot:
        raise parse_error(f"filter ({text})", f'unexpected "{text[-1:]}" expecting "."')
    if op == "in":
        return Condition(fld, op, _parse_list(value), negate)
    if in_tree:
        value = _unquote_value(value)
    if op == "is":
        if value.lower() not in IS_VALUES:
            raise parse_error(
                f"filter ({op}.{value})", 'expecting "null", "not_null", "true", "false" or "unknown"'
            )
        return Condition(fld, op, value.lower(), negate)
    if op not in OPERATORS:
        raise parse_error(f"filter ({op}.{value})", f'unknown operator "{op}"')
    if op in ("like", "ilike"):
        value = value.replace("*", "%")
    return Condition(fld, op, value, negate)


def _parse_list(value: str) -> list[str]:
    if not (value.startswith("(") and value.endswith(")")):
        raise parse_error(f"filter (in.{value})", 'unexpected end of input expecting "("')
    inner = value[1:-1]
    return [_unquote_value(v) for v in split_top_level(inner)] if inner else []


def _unquote_value(value: str) -> str:
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def parse_logic(op: str, text: str, negate: bool) -> Logic:
    """`(a.eq.1,or(b.gt.2,c.is.null))` for `or=` / `and=`."""
    text = text.strip()
    if not (text.startswith("(") and text.endswith(")")):
        raise parse_error(f"logic tree ({text})", 'unexpected end of input expecting "("')
    items: list[Condition | Logic] = []
    for raw in split_top_level(text[1:-1]):
        raw = raw.strip()
        match = re.match(r"^(not\.)?(and|or)\(", raw)
        if match:
            items.append(parse_logic(match.group(2), raw[len(match.group(0)) - 1 :], bool(match.group(1))))
            continue
        name, dot, rest = raw.partition(".")
        if not dot:
            raise parse_error(f"logic tree ({text})", f"unexpected {raw!r}")
        items.append(parse_condition(parse_field(name), rest, in_tree=True))
    return Logic(op, tuple(items), negate)


def split_top_level(text: str) -> list[str]:
    """Split on commas outside parentheses and double quotes."""
    parts: list[str] = []
    current: list[str] = []
    depth, quoted, escaped = 0, False, False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif not quoted and ch == "(":
            depth += 1
        elif not quoted and ch == ")":
            depth -= 1
        elif not quoted and depth == 0 and ch == ",":
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return parts


def where_sql(filters: list[Condition | Logic], relation: str, params: list[object]) -> sql.Composable:
    """`true` or the conjunction of the filters; values go to `params`, never into the SQL."""
    if not filters:
        return sql.SQL("true")
    return sql.SQL(" and ").join(_node_sql(f, relation, params) for f in filters)


def _node_sql(node: Condition | Logic, relation: str, params: list[object]) -> sql.Composable:
    if isinstance(node, Logic):
        joined = sql.SQL(f" {node.op} ").join(_node_sql(i, relation, params) for i in node.items)
        expr: sql.Composable = sql.SQL("({})").format(joined if node.items else sql.SQL("true"))
    else:
        expr = _condition_sql(node, relation, params)
    return sql.SQL("not {}").format(expr) if node.negate else expr


def _condition_sql(cond: Condition, relation: str, params: list[object]) -> sql.Composable:
    column = cond.field.sql(relation)
    if cond.op == "is":
        return sql.SQL("({} is {})").format(column, sql.SQL(IS_VALUES[str(cond.value)]))
    if cond.op == "in":
        values = list(cond.value)
        if not values:
            return sql.SQL("false")
        params.extend(values)
        return sql.SQL("({} in ({}))").format(column, sql.SQL(", ").join(sql.Placeholder() for _ in values))
    params.append(cond.value)
    return sql.SQL("({} {} {})").format(column, sql.SQL(OPERATORS[cond.op]), sql.Placeholder())


def order_sql(order: list[OrderTerm], relation: str) -> sql.Composable:
    if not order:
        return sql.SQL("")
    terms = [
        sql.SQL("{} {}{}").format(
            t.field.sql(relation),
            sql.SQL("desc" if t.desc else "asc"),
            sql.SQL(f" nulls {t.nulls}" if t.nulls else ""),
        )
        for t in order
    ]
    return sql.SQL(" order by ") + sql.SQL(", ").join(terms)


def select_sql(items: list[SelectItem], relation: str) -> sql.Composable:
    parts: list[sql.Composable] = []
    for item in items:
        if item.field is None:
            parts.append(sql.SQL("{}.*").format(sql.Identifier(relation)))
            continue
        expr = item.field.sql(relation)
        if item.cast:
            expr = sql.SQL("{}::{}").format(expr, sql.SQL(item.cast))
        parts.append(sql.SQL("{} as {}").format(expr, sql.Identifier(item.alias or item.field.default_alias)))
    return sql.SQL(", ").join(parts)
