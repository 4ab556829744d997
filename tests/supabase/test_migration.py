"""The migration for today's Supabase: the file `supabase db push` applies, its grants and policies,
and its run on top of a database shaped like the SaturnOS app's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest

from agent.backends.postgres.migrate import migrate, schema_sql
from agent.backends.supabase import open_supabase
from agent.domain.run import WorkerInfo, WorkerState
from agent.domain.status import WorkerStatus
from tests.pg import TestPostgres
from tests.standin.db import prepare_database
from tests.standin.server import StandIn
from tests.supabase.harness import FAST, settings_for

REPO = Path(__file__).resolve().parents[2]
MIGRATIONS = REPO / "deploy" / "supabase" / "migrations"

# The app's tables as its migrations 0001-0024 leave them: one fixture for every app-schema test.
APP_SCHEMA = (REPO / "tests" / "appschema" / "app_schema.sql").read_text()
# A project made before the 2026 change: every table in public was granted to the API roles.
OLD_DEFAULT_GRANTS = "grant all on all tables in schema public to anon, authenticated, service_role;"

PRIVILEGES = """
select grantee, table_name, string_agg(privilege_type, ',' order by privilege_type)
from information_schema.role_table_grants
where table_schema = 'public' and table_name in ('training_runs', 'trainer_workers')
  and grantee in ('anon', 'authenticated', 'service_role')
group by grantee, table_name order by 1, 2
"""
POLICIES = """
select c.relname, c.relrowsecurity,
       coalesce(array_agg(p.polname::text order by p.polname) filter (where p.polname is not null), '{}')
from pg_class c left join pg_policy p on p.polrelid = c.oid
where c.relname in ('training_runs', 'trainer_workers') and c.relnamespace = 'public'::regnamespace
group by c.relname, c.relrowsecurity order by 1
"""
PUBLISHED = """
select tablename from pg_publication_tables where pubname = 'supabase_realtime' order by 1
"""


def rows(url: str, query: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(query).fetchall()


def test_the_supabase_migration_is_the_schema() -> None:
    files = sorted(MIGRATIONS.glob("*.sql"))
    assert [f.name.split("_", 1)[1] for f in files] == ["saturnos_agent.sql"]
    assert files[0].name.split("_", 1)[0].isdigit() and len(files[0].name.split("_", 1)[0]) == 14
    assert not files[0].is_symlink()
    assert files[0].read_text() == schema_sql()


async def test_a_fresh_project_gets_grants_rls_and_the_publication(pg_server: TestPostgres) -> None:
    url = pg_server.empty_database()
    await prepare_database(url)  # a new Supabase project: API roles, an empty publication, no grants
    await migrate(url)
    await migrate(url)  # idempotent
    assert rows(url, PRIVILEGES) == [
        ("anon", "trainer_workers", "DELETE,INSERT,SELECT,UPDATE"),
        ("anon", "training_runs", "DELETE,INSERT,SELECT,UPDATE"),
        ("authenticated", "trainer_workers", "DELETE,INSERT,SELECT,UPDATE"),
        ("authenticated", "training_runs", "DELETE,INSERT,SELECT,UPDATE"),
        ("service_role", "trainer_workers", "INSERT,SELECT,UPDATE"),
        ("service_role", "training_runs", "INSERT,SELECT,UPDATE"),
    ]
    assert rows(url, POLICIES) == [
        ("trainer_workers", True, ["trainer_workers anon all"]),
        ("training_runs", True, ["training_runs anon all"]),
    ]
    assert [r[0] for r in rows(url, PUBLISHED)] == ["trainer_workers", "training_runs"]


@pytest.mark.parametrize("old_project", [True, False], ids=["granted-before-2026", "granted-nothing"])
async def test_on_the_apps_own_schema(pg_server: TestPostgres, tmp_path: Path, old_project: bool) -> None:
    url = pg_server.empty_database()
    await prepare_database(url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(APP_SCHEMA)
        if old_project:
            conn.execute(OLD_DEFAULT_GRANTS)
    before = rows(url, PRIVILEGES)
    policies = rows(url, POLICIES)
    await migrate(url)
    await migrate(url)
    after = rows(url, PRIVILEGES)
    # Never wider for the app's roles than the app's "anon all" policies already made them.
    for grantee, table, privileges in after:
        if grantee in ("anon", "authenticated"):
            had = dict(((g, t), p) for g, t, p in before).get((grantee, table), "")
            assert set(privileges.split(",")) <= set(had.split(",")) | {
                "SELECT",
                "INSERT",
                "UPDATE",
                "DELETE",
            }
    if old_project:
        assert after == before  # everything was granted already: nothing changes
    assert rows(url, POLICIES) == policies  # the app's row level security, untouched
    assert [r[0] for r in rows(url, PUBLISHED)] == ["trainer_workers", "training_runs"]

    # The agent works on it through the stand-in: its startup check, its registry, a claim.
    server = StandIn(url, tmp_path / "storage")
    await server.start()
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            project = conn.execute("insert into projects (name) values ('p') returning id").fetchone()
            assert project is not None
            run = conn.execute(
                "insert into training_runs (run_name, project_id, data_yaml) values ('r', %s, 'd.yaml')"
                " returning id",
                [project[0]],
            ).fetchone()
            assert run is not None
        backends = await open_supabase(settings_for(server, tmp_path / "agent"), tuning=FAST)
        try:
            await backends.store.register_worker(
                WorkerInfo("w1", "host", (), "test", 1), WorkerState(WorkerStatus.ONLINE, ())
            )
            claim = await backends.store.claim(str(run[0]), "w1")
            assert claim is not None and claim.lease.attempt == 1
        finally:
            await backends.close()
    finally:
        await server.stop()
    # The app's own trigger still runs: deleting the project cancels its running run.
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("delete from projects")
        ended = conn.execute("select status, error_message from training_runs").fetchall()
    assert ended == [("canceled", "Project deleted.")]
