"""The project database: a small connection pool and the setup a new Supabase project has."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import pq

log = logging.getLogger(__name__)

Conn = psycopg.AsyncConnection[tuple[Any, ...]]

API_ROLES = ("anon", "authenticated", "service_role")
PUBLICATION = "supabase_realtime"

_ROLES_SQL = """
do $$
declare
    r text;
begin
    foreach r in array array['anon', 'authenticated', 'service_role'] loop
        begin
            if not exists (select 1 from pg_roles where rolname = r) then
                execute format('create role %I nologin noinherit%s', r,
                               case when r = 'service_role' then ' bypassrls' else '' end);
            end if;
        exception when duplicate_object or unique_violation then null;
        end;
    end loop;
end
$$;
"""

# What a Supabase project grants the API roles today: the schema, and nothing in it. Since the
# 2026 change (new projects from 2026-05-30, every project from 2026-10-30) tables created in
# `public` are not granted to anon, authenticated or service_role: a migration grants what it needs.
# Functions stay executable by PUBLIC, as Postgres makes them.
_GRANTS_SQL = """
grant usage on schema public to anon, authenticated, service_role;
"""

_EVENT_TRIGGER_SQL = """
drop event trigger if exists standin_sync_capture;
create event trigger standin_sync_capture on ddl_command_end
    when tag in ('CREATE PUBLICATION', 'ALTER PUBLICATION', 'DROP PUBLICATION',
                 'CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO')
    execute function standin.on_ddl();
"""


@dataclass(frozen=True)
class Capabilities:
    """What the database let the stand-in set up."""

    role_switching: bool  # requests run as anon / authenticated / service_role, as PostgREST does
    event_trigger: bool  # capture triggers follow publication changes inside the DDL transaction


async def prepare_database(url: str) -> Capabilities:
    """Set the database up as a new Supabase project has it; idempotent."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        role_switching = await _try(conn, _ROLES_SQL + _GRANTS_SQL, "API roles")
        if role_switching:
            role_switching = await _can_switch_roles(conn)
        await conn.execute((Path(__file__).parent / "setup.sql").read_text())
        event_trigger = await _try(conn, _EVENT_TRIGGER_SQL, "event trigger")
        await conn.execute("select standin.sync_capture_triggers()")
        # Changes committed while no stand-in ran were never subscribed to: Realtime drops them too.
        await conn.execute("delete from standin.changes")
    return Capabilities(role_switching=role_switching, event_trigger=event_trigger)


async def _try(conn: Conn, statements: str, what: str) -> bool:
    try:
        await conn.execute(statements)
    except psycopg.errors.InsufficientPrivilege as exc:
        log.warning("stand-in: cannot set up the %s (%s); continuing without", what, exc.diag.message_primary)
        return False
    return True


async def _can_switch_roles(conn: Conn) -> bool:
    try:
        async with conn.transaction():
            for role in API_ROLES:
                await conn.execute("select set_config('role', %s, true)", [role])
    except psycopg.Error as exc:
        log.warning("stand-in: cannot act as the API roles (%s); requests run as the connecting user", exc)
        return False
    return True


class Pool:
    """A few reusable connections; enough for a test server, no more."""

    def __init__(self, url: str, size: int = 10) -> None:
        self._url = url
        self._idle: list[Conn] = []
        self._slots = asyncio.Semaphore(size)
        self._closed = False

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Conn]:
        """A connection outside any transaction; returned to the pool afterwards."""
        async with self._slots:
            conn = await self._take()
            try:
                yield conn
            finally:
                await self._give_back(conn)

    async def _take(self) -> Conn:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
        return await psycopg.AsyncConnection.connect(self._url)

    async def _give_back(self, conn: Conn) -> None:
        if conn.closed:
            return
        if conn.info.transaction_status != pq.TransactionStatus.IDLE:
            try:
                await conn.rollback()
            except psycopg.Error:
                await conn.close()
                return
        if self._closed:
            await conn.close()
        else:
            self._idle.append(conn)

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.close()
