"""The change feed: captured row changes, read back after commit and shaped as Realtime sends them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg

from tests.standin.db import PUBLICATION, Pool

log = logging.getLogger(__name__)

MAX_RECORD_BYTES = 1024 * 1024  # Realtime's default `max_record_bytes`
SMALL_VALUE_BYTES = 64  # what it keeps of each value when a record is over that size


@dataclass
class Change:
    """One captured row change, with the columns of its table as they are now."""

    id: int
    schema: str
    table: str
    type: str
    record: dict[str, Any] | None
    old_record: dict[str, Any] | None
    has_pk: bool
    commit_timestamp: datetime
    columns: list[dict[str, str]] = field(default_factory=list)
    primary_key: list[str] = field(default_factory=list)

    def unauthorized(self) -> dict[str, Any]:
        """The `data` apply_rls sends a subscriber whose role may not select the primary key."""
        data: dict[str, Any] = {
            "columns": [],
            "commit_timestamp": None,
            "errors": ["Error 401: Unauthorized"],
            "schema": self.schema,
            "table": self.table,
            "type": self.type,
            "record": {},
        }
        if self.type == "UPDATE":
            data["old_record"] = {}
        return data

    def data(self, select: list[str] | None = None, *, keys_only_old: bool = False) -> dict[str, Any]:
        """The `data` of a `postgres_changes` push, as Realtime's apply_rls builds it."""
        if not self.has_pk and self.type != "DELETE":
            # Realtime refuses to describe rows it cannot identify: it sends only the error.
            data: dict[str, Any] = {
                "columns": [],
                "commit_timestamp": None,
                "errors": ["Error 400: Bad Request, no primary key"],
                "schema": self.schema,
                "table": self.table,
                "type": self.type,
                "record": {},
            }
            if self.type == "UPDATE":
                data["old_record"] = {}
            return data
        record, old_record = self.record, self.old_record
        if keys_only_old and self.type == "DELETE" and old_record is not None:
            # With row level security a deleted row cannot be checked: apply_rls sends its key only.
            old_record = {k: v for k, v in old_record.items() if k in self.primary_key}
        columns = self.columns
        if select is not None:
            record = _project(record, select)
            old_record = _project(old_record, select)
            columns = [c for c in columns if c["name"] in select]
        errors = None
        if len(json.dumps([record, old_record])) > MAX_RECORD_BYTES:
            errors = ["Error 413: Payload Too Large"]
            record, old_record = _small_values(record), _small_values(old_record)
        data = {
            "columns": columns,
            "commit_timestamp": _realtime_timestamp(self.commit_timestamp),
            "errors": errors,
            "schema": self.schema,
            "table": self.table,
            "type": self.type,
        }
        if self.type in ("INSERT", "UPDATE"):
            data["record"] = record
        if self.type in ("UPDATE", "DELETE"):
            data["old_record"] = old_record
        return data


def _realtime_timestamp(ts: datetime) -> str:
    # to_char(ts at time zone 'utc', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'), as apply_rls formats it
    ts = ts.astimezone(UTC)
    return ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


def _project(row: dict[str, Any] | None, select: list[str]) -> dict[str, Any] | None:
    return None if row is None else {k: v for k, v in row.items() if k in select}


def _small_values(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {k: v for k, v in row.items() if len(json.dumps(v)) <= SMALL_VALUE_BYTES}


Deliver = Callable[[list[Change]], Awaitable[None]]


class ChangeFeed:
    """LISTENs for captured changes, reads them after commit, and hands them on in order."""

    def __init__(self, url: str, pool: Pool, deliver: Deliver, *, resync_triggers: bool) -> None:
        self._url = url
        self._pool = pool
        self._deliver = deliver
        self._resync_triggers = resync_triggers
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        listening = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._listen(listening), name="standin-listen"),
            asyncio.create_task(self._drain_loop(), name="standin-drain"),
        ]
        await asyncio.wait_for(listening.wait(), timeout=10)

    async def stop(self) -> None:
        # The flag as well as the cancel: on Python 3.11 a cancel that races a wake-up can be lost.
        self._stop.set()
        self._wake.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []

    async def _listen(self, listening: asyncio.Event) -> None:
        while not self._stop.is_set():
            try:
                async with await psycopg.AsyncConnection.connect(self._url, autocommit=True) as conn:
                    await conn.execute("listen standin_changes")
                    listening.set()
                    self._wake.set()  # whatever committed while not listening
                    async for _ in conn.notifies():
                        self._wake.set()
            except psycopg.OperationalError as exc:
                if self._stop.is_set():
                    return
                log.warning("stand-in: change listener lost its connection (%s); reconnecting", exc)
                await asyncio.sleep(0.5)

    async def _drain_loop(self) -> None:
        while not self._stop.is_set():
            # The timeout is a safety net for a lost notification and, without the event trigger,
            # the beat at which capture triggers follow the publication.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._wake.wait()
            if self._stop.is_set():
                return
            self._wake.clear()
            try:
                changes = await self._read()
                if changes:
                    await self._deliver(changes)
            except psycopg.Error as exc:
                log.warning("stand-in: reading captured changes failed: %s", exc)
                await asyncio.sleep(0.2)

    async def _read(self) -> list[Change]:
        async with self._pool.connection() as conn, conn.transaction():
            if self._resync_triggers:
                await conn.execute("select standin.sync_capture_triggers()")
            cur = await conn.execute(
                "delete from standin.changes returning id, schema_name, table_name, type, record,"
                " old_record, has_pk, commit_timestamp"
            )
            rows = sorted(await cur.fetchall(), key=lambda r: int(r[0]))
            if not rows:
                return []
            tables = sorted({(str(r[1]), str(r[2])) for r in rows})
            cur = await conn.execute(
                """
                select n.nspname, c.relname,
                       jsonb_agg(jsonb_build_object('name', a.attname, 'type', t.typname) order by a.attnum),
                       exists (select 1 from pg_publication_tables pt
                               where pt.pubname = %s and pt.schemaname = n.nspname
                                 and pt.tablename = c.relname),
                       coalesce((select array_agg(k.attname::text) from pg_index i
                                 join pg_attribute k on k.attrelid = i.indrelid and k.attnum = any(i.indkey)
                                 where i.indrelid = c.oid and i.indisprimary), '{}')
                from pg_class c
                join pg_namespace n on n.oid = c.relnamespace
                join pg_attribute a on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
                join pg_type t on t.oid = a.atttypid
                where (n.nspname, c.relname) in (select * from unnest(%s::text[], %s::text[]))
                group by n.nspname, c.relname, c.oid
                """,
                [PUBLICATION, [t[0] for t in tables], [t[1] for t in tables]],
            )
            info: dict[tuple[str, str], tuple[list[dict[str, str]], bool, list[str]]] = {
                (str(r[0]), str(r[1])): (list(r[2]), bool(r[3]), list(r[4])) for r in await cur.fetchall()
            }
        changes = []
        for change_id, schema, table, type_, record, old_record, has_pk, ts in rows:
            columns, published, primary_key = info.get((str(schema), str(table)), ([], False, []))
            if not published:
                continue  # left the publication: Realtime no longer decodes its changes
            bytea = {c["name"] for c in columns if c["type"] == "bytea"}
            changes.append(
                Change(
                    id=int(change_id),
                    schema=str(schema),
                    table=str(table),
                    type=str(type_),
                    record=_hex_bytea(record, bytea),
                    old_record=_hex_bytea(old_record, bytea),
                    has_pk=bool(has_pk),
                    commit_timestamp=ts,
                    columns=columns,
                    primary_key=primary_key,
                )
            )
        return changes


def _hex_bytea(row: dict[str, Any] | None, bytea: set[str]) -> dict[str, Any] | None:
    # wal2json writes bytea as bare hex, where to_jsonb writes "\x..."
    if row is None or not bytea:
        return row
    return {
        k: (v[2:] if k in bytea and isinstance(v, str) and v.startswith("\\x") else v) for k, v in row.items()
    }
