"""PostgREST at `/rest/v1`: tables and `rpc/`, run as the request's role inside one transaction."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import psycopg
from aiohttp import web
from psycopg import sql
from psycopg.types.json import Jsonb

from tests.standin.auth import TokenError, verify
from tests.standin.db import Pool
from tests.standin.rest_query import Query, RestError, parse_query, select_sql, split_top_level, where_sql
from tests.standin.rest_rpc import call_function, find_function
from tests.standin.rest_sql import Conn, Outcome, aggregate, count_rows, ranged

JSON_TYPE = "application/json"
OBJECT_TYPE = "application/vnd.pgrst.object+json"
ARRAY_TYPE = "application/vnd.pgrst.array+json"


@dataclass
class Table:
    schema: str
    name: str
    columns: dict[str, str]  # name -> type
    pk: list[str]

    @property
    def ident(self) -> sql.Composable:
        return sql.Identifier(self.schema, self.name)


@dataclass
class Request:
    """The parts of an HTTP request that PostgREST's planner reads."""

    method: str
    path: str
    schema: str
    target: str
    query: Query
    params: list[tuple[str, str]]
    prefer: dict[str, str]
    single: bool
    strip_nulls: bool
    body: Any = None

    @property
    def returns_body(self) -> bool:
        return self.prefer.get("return") == "representation"

    @property
    def count(self) -> bool:
        return self.prefer.get("count") in ("exact", "planned", "estimated")


class Rollback(Exception):
    """Abort the transaction and answer with this response."""

    def __init__(self, response: web.Response) -> None:
        super().__init__()
        self.response = response


class GatewayError(Exception):
    """The API gateway refused the request before PostgREST saw it."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.body = {"message": message, "hint": hint}


class Rest:
    """The PostgREST endpoint."""

    def __init__(
        self, pool: Pool, jwt_secret: str, *, role_switching: bool, schemas: tuple[str, ...]
    ) -> None:
        self._pool = pool
        self._secret = jwt_secret
        self._role_switching = role_switching
        self._schemas = schemas

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            claims = self._authenticate(request)
            req = await self._read(request)
        except GatewayError as exc:
            return web.json_response(exc.body, status=401)
        except RestError as exc:
            return error_response(exc)
        if req.target == "":
            return web.json_response({"swagger": "2.0", "info": {"title": "stand-in PostgREST"}, "paths": {}})
        role = str(claims.get("role") or "anon")
        try:
            async with self._pool.connection() as conn:
                return await self._run(conn, req, role, claims)
        except Rollback as rollback:
            return rollback.response
        except RestError as exc:
            return error_response(exc)
        except psycopg.Error as exc:
            return error_response(from_pg_error(exc, anonymous=role == "anon"))

    def _authenticate(self, request: web.Request) -> dict[str, Any]:
        """The gateway's apikey check, then PostgREST's check of the bearer JWT (none: anon)."""
        apikey = request.headers.get("apikey") or request.query.get("apikey")
        if not apikey:
            raise GatewayError(
                "No API key found in request", "No `apikey` request header or url param was found."
            )
        try:
            verify(apikey, self._secret)
        except TokenError:
            raise GatewayError(
                "Invalid API key", "Double check your Supabase `anon` or `service_role` API key."
            ) from None
        token = re.sub(
            r"^Bearer\s+", "", request.headers.get("Authorization", ""), flags=re.IGNORECASE
        ).strip()
        if not token:
            return {"role": "anon"}
        try:
            return verify(token, self._secret, require_role=False)
        except TokenError as exc:
            if exc.kind == "expired":
                raise RestError(401, "PGRST303", "JWT expired") from None
            message = (
                "JWSError JWSInvalidSignature"
                if exc.kind == "signature"
                else "Expected 3 parts in JWT; got 1"
            )
            raise RestError(401, "PGRST301", message) from None

    async def _read(self, request: web.Request) -> Request:
        method = request.method
        read = method in ("GET", "HEAD")
        profile = request.headers.get("Accept-Profile" if read else "Content-Profile") or self._schemas[0]
        if profile not in self._schemas:
            raise RestError(
                406, "PGRST106", f"The schema must be one of the following: {', '.join(self._schemas)}"
            )
        accept = request.headers.get("Accept", JSON_TYPE)
        media = accept.split(";")[0].strip().lower()
        if media not in (JSON_TYPE, OBJECT_TYPE, ARRAY_TYPE, "*/*", ""):
            raise RestError(406, "PGRST107", f"None of these media types are available: {accept}")
        params = list(request.query.items())
        target = request.match_info.get("tail", "")
        is_rpc = target.startswith("rpc/")
        # A GET function call takes its arguments from the query string: filters are sorted out later.
        query = parse_query(params, filters_allowed=not (is_rpc and read))
        body: Any = None
        if method in ("POST", "PATCH", "PUT"):
            raw = await request.read()
            if raw.strip():
                try:
                    body = json.loads(raw)
                except ValueError as exc:
                    raise RestError(400, "PGRST102", "Empty or invalid json", str(exc)) from None
            elif not is_rpc:
                raise RestError(400, "PGRST102", "Empty or invalid json")
        if read:
            _apply_range(query, request.headers.get("Range"))
        return Request(
            method=method,
            path=request.path,
            schema=profile,
            target=target,
            query=query,
            params=params,
            prefer=_prefer(request.headers.getall("Prefer", [])),
            single=media == OBJECT_TYPE,
            strip_nulls="nulls=stripped" in accept.replace(" ", ""),
            body=body,
        )

    async def _run(self, conn: Conn, req: Request, role: str, claims: dict[str, Any]) -> web.Response:
        async with conn.transaction():
            if req.method in ("GET", "HEAD"):
                await conn.execute("set transaction read only")
            await conn.execute(
                "select set_config('request.jwt.claims', %s, true), set_config('request.method', %s, true),"
                " set_config('request.path', %s, true), set_config('timezone', %s, true)",
                [json.dumps(claims), req.method, req.path, req.prefer.get("timezone", "UTC")],
            )
            if self._role_switching:
                await conn.execute("select set_config('role', %s, true)", [role])
            response = await self._dispatch(conn, req)
            if req.prefer.get("tx") == "rollback":
                raise Rollback(response)
            return response

    async def _dispatch(self, conn: Conn, req: Request) -> web.Response:
        if req.target.startswith("rpc/"):
            return await self._rpc(conn, req, req.target[4:])
        if "/" in req.target:
            raise RestError(404, "PGRST125", f"Invalid path specified in request URL: /{req.target}")
        table = await load_table(conn, req.schema, req.target)
        if req.method in ("GET", "HEAD"):
            return await _select(conn, req, table)
        if req.method == "POST":
            return await _insert(conn, req, table)
        if req.method == "PATCH":
            return await _update(conn, req, table)
        if req.method == "DELETE":
            return await _delete(conn, req, table)
        raise RestError(405, "PGRST117", f"Unsupported HTTP method: {req.method}")

    async def _rpc(self, conn: Conn, req: Request, name: str) -> web.Response:
        if req.method in ("GET", "HEAD"):
            fn = await find_function(conn, req.schema, name, {k for k, _ in req.params}, req.params)
            args: dict[str, Any] = {k: v for k, v in req.params if k in fn.arg_names}
            req.query = parse_query([(k, v) for k, v in req.params if k not in fn.arg_names])
        elif req.method == "POST":
            if req.body is not None and not isinstance(req.body, dict):
                raise RestError(400, "PGRST102", "Empty or invalid json")
            args = req.body or {}
            fn = await find_function(conn, req.schema, name, set(args), [])
        else:
            raise RestError(405, "PGRST101", "Only GET and POST verbs are allowed for RPC")
        result = await call_function(conn, fn, args, req.query, req.single, req.strip_nulls, req.count)
        if result is None:
            return web.Response(status=204)
        if isinstance(result, Outcome):
            return _read_response(req, result)
        return _json(req, result, 200)


async def load_table(conn: Conn, schema: str, name: str) -> Table:
    """The table from the catalog, or PostgREST's 404 for a relation it does not know."""
    cur = await conn.execute(
        """
        select (select coalesce(json_object_agg(a.attname, format_type(a.atttypid, a.atttypmod)), '{}')
                from pg_attribute a where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped),
               (select coalesce(json_agg(a.attname order by array_position(i.indkey::int2[], a.attnum)), '[]')
                from pg_index i join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey)
                where i.indrelid = c.oid and i.indisprimary)
        from pg_class c join pg_namespace n on n.oid = c.relnamespace
        where n.nspname = %s and c.relname = %s and c.relkind in ('r', 'v', 'm', 'f', 'p')
        """,
        [schema, name],
    )
    row = await cur.fetchone()
    if row is None:
        raise RestError(404, "PGRST205", f"Could not find the table '{schema}.{name}' in the schema cache")
    return Table(schema, name, dict(row[0]), list(row[1]))


# Reads -----------------------------------------------------------------------------------------


async def _select(conn: Conn, req: Request, table: Table) -> web.Response:
    params: list[object] = []
    rows = sql.SQL("select {} from {} where {}").format(
        select_sql(req.query.select, table.name),
        table.ident,
        where_sql(req.query.filters, table.name, params),
    )
    total = await count_rows(conn, rows, list(params)) if req.count else None
    outcome = await aggregate(conn, ranged(rows, req.query, table.name), params, strip_nulls=req.strip_nulls)
    outcome.total = total
    return _read_response(req, outcome)


def _read_response(req: Request, outcome: Outcome) -> web.Response:
    offset = req.query.offset
    if outcome.total is not None and offset > outcome.total:
        raise RestError(
            416,
            "PGRST103",
            "Requested range not satisfiable",
            f"An offset of {offset} was requested, but there are only {outcome.total} rows.",
        )
    body = outcome.body
    if req.single:
        if outcome.rows != 1:
            raise _not_one_row(outcome.rows)
        body = json.dumps(json.loads(body)[0])
    status = 206 if outcome.total is not None and outcome.rows < outcome.total else 200
    response = _json(req, body, status)
    response.headers["Content-Range"] = _content_range(offset, outcome.rows, outcome.total)
    return response


# Writes ----------------------------------------------------------------------------------------


async def _insert(conn: Conn, req: Request, table: Table) -> web.Response:
    rows = req.body if isinstance(req.body, list) else [req.body]
    if not all(isinstance(r, dict) for r in rows):
        raise RestError(400, "PGRST102", "All object keys must match")
    columns = _payload_columns(req, rows, table)
    on_conflict = _on_conflict(req, table, columns)
    params: list[object] = []
    if not rows:
        with_items = sql.SQL("pgrst_source as (select * from {} where false)").format(table.ident)
    elif not columns:
        with_items = sql.SQL("pgrst_source as (insert into {} default values returning *)").format(
            table.ident
        )
    elif req.prefer.get("missing") == "default" and len(rows) > 1:
        # Keys a row lacks take the column default: one insert per row, each with its own columns.
        items = []
        for i, row in enumerate(rows):
            cols = sql.SQL(", ").join(sql.Identifier(c) for c in row if c in columns)
            if row:
                params.append(Jsonb(row))
                insert = sql.SQL(
                    "insert into {} ({}) select {} from jsonb_populate_record(null::{}, %s) {}"
                ).format(table.ident, cols, cols, table.ident, on_conflict)
            else:
                insert = sql.SQL("insert into {} default values").format(table.ident)
            items.append(sql.SQL("{} as ({} returning *)").format(sql.Identifier(f"pgrst_row_{i}"), insert))
        union = sql.SQL(" union all ").join(
            sql.SQL("select * from {}").format(sql.Identifier(f"pgrst_row_{i}")) for i in range(len(rows))
        )
        with_items = sql.SQL("{}, pgrst_source as ({})").format(sql.SQL(", ").join(items), union)
    else:
        cols = sql.SQL(", ").join(sql.Identifier(c) for c in columns)
        params.append(Jsonb(rows))
        with_items = sql.SQL(
            "pgrst_source as (insert into {} ({}) select {} from jsonb_populate_recordset(null::{}, %s) {}"
            " returning *)"
        ).format(table.ident, cols, cols, table.ident, on_conflict)
    outcome = await _mutate(conn, with_items, params, req)
    return _write_response(req, outcome, created=True)


async def _update(conn: Conn, req: Request, table: Table) -> web.Response:
    if not isinstance(req.body, dict):
        raise RestError(400, "PGRST102", "Empty or invalid json")
    _check_columns(list(req.body), table)
    if not req.query.has_filters:
        raise RestError(400, "21000", "UPDATE requires a WHERE clause")  # pg-safeupdate, as on Supabase
    params: list[object] = []
    if req.body:
        assignments = sql.SQL(", ").join(
            sql.SQL("{} = {}").format(sql.Identifier(c), sql.Identifier("pgrst_body", c)) for c in req.body
        )
        params.append(Jsonb(req.body))
        where = where_sql(req.query.filters, table.name, params)
        with_items = sql.SQL(
            "pgrst_source as (update {} set {} from jsonb_populate_record(null::{}, %s) as pgrst_body"
            " where {} returning {}.*)"
        ).format(table.ident, assignments, table.ident, where, table.ident)
    else:
        with_items = sql.SQL("pgrst_source as (select * from {} where false)").format(table.ident)
    outcome = await _mutate(conn, with_items, params, req)
    return _write_response(req, outcome, created=False)


async def _delete(conn: Conn, req: Request, table: Table) -> web.Response:
    if not req.query.has_filters:
        raise RestError(400, "21000", "DELETE requires a WHERE clause")  # pg-safeupdate, as on Supabase
    params: list[object] = []
    where = where_sql(req.query.filters, table.name, params)
    with_items = sql.SQL("pgrst_source as (delete from {} where {} returning {}.*)").format(
        table.ident, where, table.ident
    )
    outcome = await _mutate(conn, with_items, params, req)
    return _write_response(req, outcome, created=False)


async def _mutate(conn: Conn, with_items: sql.Composable, params: list[object], req: Request) -> Outcome:
    """Run a write as PostgREST does: a CTE, the representation selected from its RETURNING rows."""
    rows = sql.SQL("select {} from pgrst_source").format(select_sql(req.query.select, "pgrst_source"))
    outcome = await aggregate(conn, rows, params, strip_nulls=req.strip_nulls, with_items=with_items)
    limit = req.prefer.get("max-affected")
    if limit is not None and req.prefer.get("handling") == "strict" and outcome.rows > int(limit):
        raise Rollback(
            error_response(
                RestError(
                    400,
                    "PGRST124",
                    "Query result exceeds max-affected preference constraint",
                    f"The query affects {outcome.rows} rows",
                )
            )
        )
    if req.single and outcome.rows != 1:
        raise Rollback(error_response(_not_one_row(outcome.rows)))
    if req.count:
        outcome.total = outcome.rows
    return outcome


def _write_response(req: Request, outcome: Outcome, *, created: bool) -> web.Response:
    if req.returns_body:
        body = json.dumps(json.loads(outcome.body)[0]) if req.single else outcome.body
        response = _json(req, body, 201 if created else 200)
    else:
        response = web.Response(status=201 if created else 204)
    total = "*" if outcome.total is None else str(outcome.total)
    response.headers["Content-Range"] = (
        f"*/{total}" if created else _content_range(0, outcome.rows, outcome.total)
    )
    applied = [
        f"{k}={req.prefer[k]}" for k in ("return", "count", "resolution", "missing") if k in req.prefer
    ]
    if applied:
        response.headers["Preference-Applied"] = ", ".join(applied)
    return response


def _check_columns(columns: list[str], table: Table) -> None:
    for column in columns:
        if column not in table.columns:
            raise RestError(
                400, "PGRST204", f"Could not find the '{column}' column of '{table.name}' in the schema cache"
            )


def _payload_columns(req: Request, rows: list[dict[str, Any]], table: Table) -> list[str]:
    listed = dict(req.params).get("columns")
    if listed is not None:
        columns = [c.strip().strip('"') for c in split_top_level(listed) if c.strip()]
    elif rows:
        columns = list(rows[0])
        if req.prefer.get("missing") != "default" and any(set(r) != set(columns) for r in rows[1:]):
            raise RestError(400, "PGRST102", "All object keys must match")
    else:
        columns = []
    _check_columns(columns, table)
    return columns


def _on_conflict(req: Request, table: Table, columns: list[str]) -> sql.Composable:
    resolution = req.prefer.get("resolution")
    if resolution not in ("merge-duplicates", "ignore-duplicates"):
        return sql.SQL("")
    listed = dict(req.params).get("on_conflict")
    target = [c.strip() for c in listed.split(",") if c.strip()] if listed else table.pk
    if not target:
        raise RestError(
            400, "42P10", "there is no unique or exclusion constraint matching the ON CONFLICT specification"
        )
    _check_columns(target, table)
    conflict = sql.SQL(", ").join(sql.Identifier(c) for c in target)
    if resolution == "ignore-duplicates" or not columns:
        return sql.SQL("on conflict ({}) do nothing").format(conflict)
    updates = sql.SQL(", ").join(sql.SQL("{0} = excluded.{0}").format(sql.Identifier(c)) for c in columns)
    return sql.SQL("on conflict ({}) do update set {}").format(conflict, updates)


def _not_one_row(rows: int) -> RestError:
    return RestError(
        406,
        "PGRST116",
        "Cannot coerce the result to a single JSON object",
        f"The result contains {rows} rows",
    )


def _content_range(offset: int, rows: int, total: int | None) -> str:
    total_text = "*" if total is None else str(total)
    return f"*/{total_text}" if rows == 0 else f"{offset}-{offset + rows - 1}/{total_text}"


def _json(req: Request, body: str, status: int) -> web.Response:
    content_type = OBJECT_TYPE if req.single else JSON_TYPE
    return web.Response(
        status=status, text=None if req.method == "HEAD" else body, content_type=content_type, charset="utf-8"
    )


def _prefer(values: list[str]) -> dict[str, str]:
    prefer: dict[str, str] = {}
    for value in values:
        for item in value.split(","):
            key, _, val = item.strip().partition("=")
            if key:
                prefer[key.strip()] = val.strip()
    return prefer


def _apply_range(query: Query, header: str | None) -> None:
    """`Range: 0-9` (items) is another way to say offset 0, limit 10."""
    match = re.fullmatch(r"\s*(?:items=)?(\d+)-(\d*)\s*", header or "")
    if not match:
        return
    start = int(match.group(1))
    if query.offset == 0:
        query.offset = start
    if match.group(2) and query.limit is None:
        query.limit = max(0, int(match.group(2)) - start + 1)


def error_response(exc: RestError) -> web.Response:
    return web.json_response(exc.body(), status=exc.status)


# PostgREST's mapping of SQLSTATEs to HTTP statuses: exact codes, then classes, else 400.
_STATUS_BY_CODE = {
    "23503": 409,
    "23505": 409,
    "25006": 405,
    "42883": 404,
    "42P01": 404,
    "42P17": 500,
    "P0001": 400,
}
_STATUS_BY_CLASS = {
    "08": 503, "09": 500, "0L": 403, "0P": 403, "25": 500, "28": 403, "2D": 500, "38": 500, "39": 500,
    "3B": 500, "40": 500, "53": 503, "54": 500, "55": 500, "57": 500, "58": 500, "F0": 500, "HV": 500,
    "P0": 500, "XX": 500,
}  # fmt: skip


def from_pg_error(exc: psycopg.Error, *, anonymous: bool) -> RestError:
    code = exc.sqlstate or "XX000"
    if code == "42501":
        status = 401 if anonymous else 403
    else:
        status = _STATUS_BY_CODE.get(code) or _STATUS_BY_CLASS.get(code[:2], 400)
    diag = exc.diag
    return RestError(status, code, diag.message_primary or str(exc), diag.message_detail, diag.message_hint)
