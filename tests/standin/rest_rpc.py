"""PostgREST's `rpc/`: pick the function by its argument names and call it with named arguments."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from psycopg import sql
from psycopg.types.json import Json

from tests.standin.rest_query import Query, RestError, select_sql, where_sql
from tests.standin.rest_sql import Conn, Outcome, aggregate, count_rows, ranged


@dataclass
class Function:
    schema: str
    name: str
    arg_names: list[str]
    arg_types: list[str]
    required: set[str]
    retset: bool
    kind: str  # "void" | "scalar" | "composite"


async def find_function(
    conn: Conn, schema: str, name: str, keys: set[str], query_params: list[tuple[str, str]]
) -> Function:
    """The overload whose arguments fit the given names (GET: the query string names that are arguments)."""
    cur = await conn.execute(
        """
        select coalesce(p.proargnames, '{}'), coalesce(p.proargmodes::text[], '{}'),
               p.proargtypes::regtype[]::text[], p.pronargs, p.pronargdefaults, p.proretset,
               p.prorettype::regtype::text, t.typtype
        from pg_proc p
        join pg_namespace n on n.oid = p.pronamespace
        join pg_type t on t.oid = p.prorettype
        where n.nspname = %s and p.proname = %s and p.prokind in ('f', 'p')
        """,
        [schema, name],
    )
    get = bool(query_params)
    for all_names, modes, in_types, nargs, ndefaults, retset, rettype, typtype in await cur.fetchall():
        if modes:
            in_names = [n for n, m in zip(all_names, modes, strict=False) if m in ("i", "b", "v")]
        else:
            in_names = list(all_names[:nargs])
        if len(in_names) != len(in_types) or any(not n for n in in_names):
            continue  # unnamed arguments cannot be called by name
        required = set(in_names[: nargs - ndefaults])
        given = keys & set(in_names) if get else keys
        if not given <= set(in_names) or not required <= given:
            continue
        if rettype == "void":
            kind = "void"
        elif typtype == "c" or rettype == "record":
            kind = "composite"
        else:
            kind = "scalar"
        return Function(schema, name, in_names, list(in_types), required, bool(retset), kind)
    listed = ", ".join(sorted(keys)) if not get else ", ".join(sorted(k for k, _ in query_params))
    raise RestError(
        404,
        "PGRST202",
        f"Could not find the function {schema}.{name}({listed}) in the schema cache",
        f"Searched for the function {schema}.{name} with parameters {listed} or with a single unnamed"
        " json/jsonb parameter, but no matches were found in the schema cache.",
    )


async def call_function(
    conn: Conn, fn: Function, args: dict[str, Any], query: Query, single: bool, strip_nulls: bool, count: bool
) -> Outcome | str | None:
    """None for void, JSON text for a single value, an Outcome for rows."""
    params: list[object] = []
    names = [n for n in fn.arg_names if n in args]
    named = sql.SQL(", ").join(
        sql.SQL("{} := pgrst_args.{}").format(sql.Identifier(n), sql.Identifier(n)) for n in names
    )
    call = sql.SQL("{}({})").format(sql.Identifier(fn.schema, fn.name), named)
    if names:
        types = dict(zip(fn.arg_names, fn.arg_types, strict=True))
        # Argument types come from the catalog's regtype output, which is already quoted.
        columns = sql.SQL(", ").join(
            sql.SQL("{} {}").format(sql.Identifier(n), sql.SQL(types[n])) for n in names
        )
        source: sql.Composable = sql.SQL("json_to_record(%s::json) as pgrst_args({}), lateral ").format(
            columns
        )
        params.append(Json({n: args[n] for n in names}))
    else:
        source = sql.SQL("")
    if fn.kind == "void":
        await conn.execute(sql.SQL("select 1 from {}{} as pgrst_call").format(source, call), params)
        return None
    if fn.kind == "scalar" and not fn.retset:
        cur = await conn.execute(
            sql.SQL("select to_json(pgrst_call)::text from {}{} as pgrst_call").format(source, call), params
        )
        row = await cur.fetchone()
        return str(row[0]) if row and row[0] is not None else "null"
    where = where_sql(query.filters, "pgrst_call", params)
    if fn.kind == "scalar":
        rows = sql.SQL("select pgrst_call as pgrst_scalar from {}{} as pgrst_call where {}").format(
            source, call, where
        )
    else:
        rows = sql.SQL("select {} from {}{} as pgrst_call where {}").format(
            select_sql(query.select, "pgrst_call"), source, call, where
        )
    total = await count_rows(conn, rows, list(params)) if count else None
    outcome = await aggregate(
        conn,
        ranged(rows, query, "pgrst_call"),
        params,
        strip_nulls=strip_nulls,
        scalar_column="pgrst_scalar" if fn.kind == "scalar" else None,
    )
    outcome.total = total
    if not fn.retset and not single:
        # A function returning one row answers with that object, not an array.
        return json.dumps(json.loads(outcome.body)[0]) if outcome.rows == 1 else "null"
    return outcome
