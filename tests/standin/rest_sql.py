"""Running PostgREST-shaped statements: the body is built by Postgres' json_agg, as PostgREST does."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from tests.standin.rest_query import Query, order_sql

Conn = psycopg.AsyncConnection[tuple[Any, ...]]


@dataclass
class Outcome:
    """What a statement returned: the JSON array text, its row count, and the total when counted."""

    body: str
    rows: int
    total: int | None = None


def ranged(rows_sql: sql.Composable, query: Query, relation: str) -> sql.Composable:
    """The rows in the request's order, limited to its range."""
    limit = sql.SQL(" limit {}").format(sql.Literal(query.limit)) if query.limit is not None else sql.SQL("")
    offset = sql.SQL(" offset {}").format(sql.Literal(query.offset)) if query.offset else sql.SQL("")
    return sql.SQL("{}{}{}{}").format(rows_sql, order_sql(query.order, relation), limit, offset)


async def aggregate(
    conn: Conn,
    rows_sql: sql.Composable,
    params: list[object],
    *,
    strip_nulls: bool = False,
    scalar_column: str | None = None,
    with_items: sql.Composable | None = None,
) -> Outcome:
    """`[...]` and the count of `rows_sql`; `with_items` are CTEs (writes must be at the top level)."""
    element: sql.Composable = sql.Identifier("pgrst_t")
    if scalar_column:
        element = sql.Identifier("pgrst_t", scalar_column)
    agg: sql.Composable = sql.SQL("coalesce(json_agg({}), '[]')").format(element)
    if strip_nulls:
        agg = sql.SQL("json_strip_nulls({})").format(agg)
    prefix = sql.SQL("with {} ").format(with_items) if with_items is not None else sql.SQL("")
    cur = await conn.execute(
        sql.SQL("{}select ({})::text, count(*) from ({}) pgrst_t").format(prefix, agg, rows_sql), params
    )
    row = await cur.fetchone()
    assert row is not None
    return Outcome(body=str(row[0]), rows=int(row[1]))


async def count_rows(conn: Conn, rows_sql: sql.Composable, params: list[object]) -> int:
    cur = await conn.execute(sql.SQL("select count(*) from ({}) pgrst_c").format(rows_sql), params)
    row = await cur.fetchone()
    return int(row[0]) if row else 0
