"""The test suite's own real Postgres: an embedded server, a migrated template, fresh databases."""

from __future__ import annotations

import asyncio
import os
import tempfile
import uuid
from pathlib import Path

import psycopg

from agent.backends.postgres.migrate import migrate

TEMPLATE = "saturnos_template"


class TestPostgres:
    """One embedded server per test session (per xdist worker); one database per test."""

    __test__ = False  # a fixture's helper, not a test class, despite its name

    def __init__(self, base_url: str, owned: object | None = None) -> None:
        self.base_url = base_url
        self._owned = owned

    @classmethod
    def start(cls) -> TestPostgres:
        url = os.environ.get("TEST_DATABASE_URL")
        if url:
            server = cls(url)
        else:
            from agent.backends.postgres.embedded import start_embedded

            pgdata = Path(tempfile.mkdtemp(prefix="saturnos-test-pg-"))
            embedded = start_embedded(pgdata, cleanup="delete")
            server = cls(embedded.url(), owned=embedded)
        server._make_template()
        return server

    def url(self, dbname: str) -> str:
        info = psycopg.conninfo.conninfo_to_dict(self.base_url)
        info["dbname"] = dbname
        return psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in info.items()})

    def _admin(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.url("postgres"), autocommit=True)

    def _make_template(self) -> None:
        with self._admin() as conn:
            conn.execute(f"drop database if exists {TEMPLATE}")
            conn.execute(f"create database {TEMPLATE}")
        asyncio.run(migrate(self.url(TEMPLATE)))

    def new_database(self, prefix: str = "t") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with self._admin() as conn:
            conn.execute(f"create database {name} template {TEMPLATE}")
        return self.url(name)

    def empty_database(self, prefix: str = "e") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with self._admin() as conn:
            conn.execute(f"create database {name}")
        return self.url(name)

    def stop(self) -> None:
        stop = getattr(self._owned, "stop", None)
        if stop is not None:
            stop()
