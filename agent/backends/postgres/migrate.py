"""Apply the idempotent schema migration."""

from __future__ import annotations

import psycopg

from agent.backends.postgres.sqlfiles import query
from agent.domain.errors import BackendError, BackendUnavailable

# Serializes concurrent migrations from several agents starting at once.
_LOCK_KEY = 0x5A7_0A6E


def schema_sql() -> str:
    return query("schema")


async def migrate(conninfo: str) -> None:
    try:
        async with (
            await psycopg.AsyncConnection.connect(conninfo, autocommit=False) as conn,
            conn.transaction(),
        ):
            await conn.execute("select pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            await conn.execute(schema_sql().encode())
    except psycopg.OperationalError as exc:
        raise BackendUnavailable(f"cannot reach the database to migrate: {exc}") from exc
    except psycopg.Error as exc:
        raise BackendError(f"migration failed: {exc}") from exc
