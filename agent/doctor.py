"""`saturnos-agent doctor`: checks that name what is misconfigured on this host and how to fix it.

Each check asks the real thing the agent will use (the database as the agent's role, the REST
calls the agent makes, a Realtime change that must arrive, a probe object in the bucket), with a
deadline, and never prints a secret. Nothing here imports torch or ultralytics: their versions
come from the installed distributions, the GPUs from nvidia-smi.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import importlib.metadata
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
import psycopg
from postgrest import APIError
from psycopg import sql
from storage3.exceptions import StorageApiError
from storage3.utils import StorageException
from supabase import AsyncClient

from agent import __version__
from agent.config import ConfigError, Settings
from agent.domain.request import model_reference
from agent.hardware import nvidia_smi

Level = Literal["ok", "warning", "error"]
Privilege = Literal["SELECT", "INSERT", "UPDATE"]
Need = Literal["agent", "admin"]

MIGRATE_FIX = (
    "run the migration: `supabase db push --workdir deploy` (deploy/supabase/migrations), or paste "
    "`saturnos-agent migrate --print` into the SQL editor, or `saturnos-agent migrate` with DATABASE_URL"
)
PUBLICATION = "supabase_realtime"
NOTIFY_TRIGGERS = ("saturnos_training_runs_notify_insert", "saturnos_training_runs_notify_update")
PROBE_PREFIX = "saturnos-agent-doctor"
MODEL_NAMES = tuple(f"YOLOv8{size}" for size in "nsmlx")


@dataclass(frozen=True)
class Check:
    """One finding: what was checked, how it went, and what to do about it."""

    name: str
    level: Level
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class Report:
    checks: tuple[Check, ...]

    @property
    def failed(self) -> bool:
        return any(c.level == "error" for c in self.checks)

    def count(self, level: Level) -> int:
        return sum(1 for c in self.checks if c.level == level)

    def as_json(self) -> str:
        return json.dumps({"ok": not self.failed, "checks": [asdict(c) for c in self.checks]}, indent=2)

    def render(self) -> str:
        lines = []
        for c in self.checks:
            lines.append(f"{c.level:8} {c.name:12} {c.detail}")
            if c.fix:
                lines.append(f"{'':8} {'':12} fix: {c.fix}")
        errors, warnings = self.count("error"), self.count("warning")
        lines.append(
            f"doctor: {errors} error{'s' * (errors != 1)}, {warnings} warning{'s' * (warnings != 1)}"
        )
        return "\n".join(lines)


@dataclass(frozen=True)
class Limits:
    """Deadlines and thresholds, in seconds and GiB."""

    connect_timeout: float = 10.0
    realtime_timeout: float = 10.0
    disk_error_gib: float = 5.0
    disk_warning_gib: float = 20.0


@dataclass(frozen=True)
class Grant:
    """Privileges a role needs on a table's columns: for the agent itself, or for `submit`/`cancel`."""

    table: str
    privilege: Privilege
    columns: tuple[str, ...]
    need: Need


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


RUN_COLUMNS = _words(
    "id status data_yaml base_model configuration cancel_requested worker_id attempt created_at "
    "started_at heartbeat_at completed_at canceled_at error_message trained_model_url results"
)
WORKER_COLUMNS = _words(
    "worker_id status last_seen host gpus version slots current_run current_runs "
    "free_slots device_type compute_type gpu_name gpu_memory_gb cpu_model ram_gb"
)
TABLES = {"training_runs": RUN_COLUMNS, "trainer_workers": WORKER_COLUMNS}
# What the agent's SQL (agent/backends/postgres/sql) and PostgREST calls read and write.
GRANTS = (
    Grant("training_runs", "SELECT", RUN_COLUMNS, "agent"),
    Grant(
        "training_runs",
        "UPDATE",
        _words(
            "status worker_id started_at heartbeat_at completed_at canceled_at error_message "
            "trained_model_url results"
        ),
        "agent",
    ),
    Grant("trainer_workers", "SELECT", ("worker_id", "slots", "gpus"), "agent"),
    Grant("trainer_workers", "INSERT", WORKER_COLUMNS, "agent"),
    Grant("trainer_workers", "UPDATE", WORKER_COLUMNS[1:], "agent"),
    Grant(
        "training_runs",
        "INSERT",
        _words("status data_yaml base_model configuration cancel_requested run_name project_id step_id"),
        "admin",
    ),
    Grant("training_runs", "UPDATE", ("cancel_requested",), "admin"),
)


class Redactor:
    """Removes this host's secrets (the database password, the service key) from any text."""

    def __init__(self, settings: Settings) -> None:
        secrets: list[str] = []
        if settings.supabase_service_role_key:
            secrets.append(settings.supabase_service_role_key)
        if settings.database_url:
            secrets.extend(_url_secrets(settings.database_url))
        # Longest first, so that a secret containing another is removed whole.
        self._secrets = sorted({s for s in secrets if len(s) >= 3}, key=len, reverse=True)

    def __call__(self, text: object) -> str:
        out = str(text)
        for secret in self._secrets:
            out = out.replace(secret, "***")
        return out


def _url_secrets(url: str) -> list[str]:
    found: list[str] = []
    with contextlib.suppress(ValueError):
        password = urlsplit(url).password
        if password:
            found.append(password)
    with contextlib.suppress(psycopg.ProgrammingError):
        value = psycopg.conninfo.conninfo_to_dict(url).get("password")
        if value:
            found.append(str(value))
    return found


def redacted_url(url: str) -> str:
    """A connection string for display: the password replaced, wherever it is."""
    return Redactor(Settings(database_url=url))(url)


# ---------------------------------------------------------------------------------------------
# Entry points


def settings_error_report(error: ConfigError) -> Report:
    """The report when the settings do not even load: one error that names the setting."""
    # ConfigError quotes the value, but no secret setting (URL, key) is one whose type is checked.
    return Report(
        (
            Check(
                "settings",
                "error",
                str(error),
                f"fix {error.key} in the environment or the EnvironmentFile (see .env.example)",
            ),
        )
    )


async def diagnose(settings: Settings, limits: Limits | None = None) -> Report:
    """Run every check for these settings; never raises for what it finds."""
    limits = limits or Limits()
    redact = Redactor(settings)
    checks: list[Check] = list(check_settings(settings, redact))
    if not any(c.level == "error" for c in checks):
        backend = settings.backend
        if backend == "supabase":
            checks += await supabase_checks(settings, limits, redact)
        else:
            checks += await postgres_checks(settings, limits, redact)
    checks.append(check_local_storage(settings))
    checks.append(await asyncio.to_thread(check_gpus))
    checks.append(check_training_libraries())
    offline, network = await check_network(settings)
    checks.append(network)
    checks.append(check_weights(settings, offline))
    checks.append(check_disk(settings, limits))
    return Report(tuple(checks))


# ---------------------------------------------------------------------------------------------
# Settings


def jwt_role(key: str) -> str | None:
    """The `role` claim of a Supabase JWT key, read without verifying it; None if not a JWT."""
    if key.startswith("sb_secret_"):
        return "service_role"
    if key.startswith("sb_publishable_"):
        return "anon"
    parts = key.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return None
    role = claims.get("role") if isinstance(claims, dict) else None
    return role if isinstance(role, str) else None


def check_settings(settings: Settings, redact: Redactor) -> list[Check]:
    summary = f"{settings.backend} backend, worker {settings.worker_id}, DATA_DIR {settings.data_dir}"
    problems: list[Check] = []
    if settings.database_url:
        try:
            info = psycopg.conninfo.conninfo_to_dict(settings.database_url)
        except psycopg.ProgrammingError as exc:
            problems.append(
                Check(
                    "settings",
                    "error",
                    f"DATABASE_URL is not a valid connection string: {redact(exc)}",
                    "use postgresql://USER:PASSWORD@HOST:PORT/DBNAME (percent-encode special characters)",
                )
            )
        else:
            if str(info.get("port")) == "6543" and "pooler.supabase.com" in str(info.get("host", "")):
                problems.append(
                    Check(
                        "settings",
                        "error",
                        "DATABASE_URL is Supabase's transaction pooler (port 6543): LISTEN fails there",
                        "use the direct connection or the session-mode pooler (port 5432)",
                    )
                )
        if settings.supabase_url:
            problems.append(
                Check(
                    "settings",
                    "warning",
                    "SUPABASE_URL and DATABASE_URL are both set: the agent uses SUPABASE_URL only",
                    "unset one of them",
                )
            )
    if settings.supabase_url:
        parts = urlsplit(settings.supabase_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            problems.append(
                Check(
                    "settings",
                    "error",
                    f"SUPABASE_URL {redact(settings.supabase_url)!r} is not an http(s) URL",
                    "set SUPABASE_URL to the project URL, e.g. https://YOUR_PROJECT.supabase.co",
                )
            )
        elif parts.path.rstrip("/") not in ("",):
            problems.append(
                Check(
                    "settings",
                    "error",
                    f"SUPABASE_URL has a path ({parts.path}): it must be the project URL, not an API URL",
                    f"set SUPABASE_URL={parts.scheme}://{parts.netloc}",
                )
            )
        key = settings.supabase_service_role_key or ""
        role = jwt_role(key)
        if role is not None and role != "service_role":
            problems.append(
                Check(
                    "settings",
                    "error",
                    f"SUPABASE_SERVICE_ROLE_KEY is a key for role {role!r}, not the service-role key",
                    "copy the service_role (secret) key from the project's API settings",
                )
            )
    if settings.dataset_root is not None and not settings.dataset_root.is_dir():
        problems.append(
            Check(
                "settings",
                "warning",
                f"DATASET_ROOT {settings.dataset_root} is not a folder: relative data_yaml paths fail",
                "create it or mount the datasets there, or unset DATASET_ROOT",
            )
        )
    if not problems:
        return [Check("settings", "ok", summary)]
    return problems


# ---------------------------------------------------------------------------------------------
# Postgres (DATABASE_URL or the embedded server)


async def postgres_checks(settings: Settings, limits: Limits, redact: Redactor) -> list[Check]:
    if settings.backend == "embedded":
        try:
            url = await _embedded_url(settings)
        except Exception as exc:
            return [
                Check(
                    "database",
                    "error",
                    f"the embedded Postgres in {settings.embedded_pgdata} did not start: {redact(exc)}",
                    "check that DATA_DIR is writable and not used by another agent, or set DATABASE_URL",
                )
            ]
    else:
        assert settings.database_url is not None
        url = settings.database_url
    started = time.monotonic()
    try:
        conn = await psycopg.AsyncConnection.connect(
            url, autocommit=True, connect_timeout=max(1, int(limits.connect_timeout))
        )
    except psycopg.Error as exc:
        return [
            Check(
                "database",
                "error",
                f"cannot connect to {redact(redacted_url(url))}: {redact(exc)}",
                "check the host, port, user and password in DATABASE_URL, and that this host may connect",
            )
        ]
    checks: list[Check] = []
    async with conn:
        elapsed = (time.monotonic() - started) * 1000
        cur = await conn.execute("select current_user, current_setting('server_version')")
        row = await cur.fetchone()
        role, version = (str(row[0]), str(row[1])) if row else ("?", "?")
        checks.append(
            Check("database", "ok", f"connected as role {role} in {elapsed:.0f} ms (PostgreSQL {version})")
        )
        columns = await _pg_columns(conn)
        checks.append(_schema_check(columns))
        checks.append(await _pg_grants(conn, role, columns))
        checks.append(await _pg_row_security(conn, role))
        checks.append(await _pg_publication(conn))
        checks.append(await _pg_events(conn, url, limits))
    return checks


async def _embedded_url(settings: Settings) -> str:
    from agent.backends.postgres.migrate import migrate
    from agent.wiring import embedded_database_url

    url = await asyncio.to_thread(embedded_database_url, settings)
    await migrate(url)  # as `run` does: the embedded database is the agent's own
    return url


Conn = psycopg.AsyncConnection[tuple[Any, ...]]


async def _pg_columns(conn: Conn) -> dict[str, set[str]]:
    cur = await conn.execute(
        "select table_name, column_name from information_schema.columns"
        " where table_schema = 'public' and table_name = any(%s)",
        [list(TABLES)],
    )
    found: dict[str, set[str]] = {t: set() for t in TABLES}
    for table, column in await cur.fetchall():
        found[str(table)].add(str(column))
    return found


def _schema_check(columns: dict[str, set[str]]) -> Check:
    missing_tables = [t for t in TABLES if not columns.get(t)]
    if missing_tables:
        return Check("schema", "error", f"missing tables: {', '.join(missing_tables)}", MIGRATE_FIX)
    missing = {t: [c for c in TABLES[t] if c not in columns[t]] for t in TABLES}
    gaps = "; ".join(f"{t} lacks {', '.join(cs)}" for t, cs in missing.items() if cs)
    if gaps:
        return Check("schema", "error", gaps, MIGRATE_FIX)
    return Check("schema", "ok", "training_runs and trainer_workers have every column the agent uses")


async def _pg_grants(conn: Conn, role: str, columns: dict[str, set[str]]) -> Check:
    """has_column_privilege for the connected role, for every column each query of the agent touches."""
    cur = await conn.execute("select has_schema_privilege(current_user, 'public', 'USAGE')")
    usage = await cur.fetchone()
    if not usage or not usage[0]:
        return Check(
            "grants",
            "error",
            f"role {role} has no USAGE on schema public",
            f"GRANT USAGE ON SCHEMA public TO {role}",
        )
    lacking: list[tuple[Grant, list[str]]] = []
    for grant in GRANTS:
        present = [c for c in grant.columns if c in columns.get(grant.table, set())]
        denied = []
        for column in present:
            cur = await conn.execute(
                "select has_column_privilege(current_user, %s::regclass, %s, %s)",
                [f"public.{grant.table}", column, grant.privilege],
            )
            ok = await cur.fetchone()
            if not ok or not ok[0]:
                denied.append(column)
        if denied:
            lacking.append((grant, denied))
    return _grants_check(role, lacking)


async def _pg_row_security(conn: Conn, role: str) -> Check:
    """Row-level security with no policy for this role hides every row: no error, and no runs."""
    cur = await conn.execute(
        """
        select c.relname::text
        from pg_class c
        join pg_namespace n on n.oid = c.relnamespace
        where n.nspname = 'public' and c.relname = any(%s) and c.relrowsecurity
          and not (select r.rolsuper or r.rolbypassrls from pg_roles r where r.rolname = current_user)
          and not (pg_has_role(current_user, c.relowner, 'USAGE') and not c.relforcerowsecurity)
          and not exists (
              select 1 from pg_policies p, unnest(p.roles) as pr(name)
              where p.schemaname = 'public' and p.tablename = c.relname
                and (pr.name = 'public' or pg_has_role(current_user, pr.name, 'MEMBER')))
        order by 1
        """,
        [list(TABLES)],
    )
    hidden = [str(r[0]) for r in await cur.fetchall()]
    if not hidden:
        return Check("rls", "ok", f"row-level security shows role {role} every row the agent needs")
    tables = ", ".join(hidden)
    return Check(
        "rls",
        "error",
        f"row-level security is on for {tables} and no policy applies to role {role}: "
        "the agent would see no run and write none",
        f"connect as a role with BYPASSRLS (ALTER ROLE {role} BYPASSRLS), or add policies for it on {tables}",
    )


def _grants_check(role: str, lacking: Sequence[tuple[Grant, Sequence[str]]]) -> Check:
    if not lacking:
        return Check("grants", "ok", f"role {role} has every privilege the agent and its commands use")
    agent = [(g, cs) for g, cs in lacking if g.need == "agent"]
    shown = agent or list(lacking)
    detail = "; ".join(f"role {role} has no {g.privilege} on {g.table} ({', '.join(cs)})" for g, cs in shown)
    statements = " ".join(
        f"GRANT {g.privilege} ({', '.join(cs)}) ON public.{g.table} TO {role};" for g, cs in shown
    )
    if agent:
        return Check("grants", "error", detail, f"{MIGRATE_FIX}; or grant it: {statements}")
    return Check(
        "grants",
        "warning",
        detail + ": the agent runs, `submit` and `cancel` with this role do not",
        f"grant it if this role submits or cancels runs: {statements}",
    )


async def _pg_publication(conn: Conn) -> Check:
    cur = await conn.execute("select 1 from pg_publication where pubname = %s", [PUBLICATION])
    if await cur.fetchone() is None:
        return Check(
            "publication",
            "ok",
            f"no {PUBLICATION} publication (not a Supabase database): agents hear runs through LISTEN/NOTIFY",
        )
    cur = await conn.execute(
        "select tablename from pg_publication_tables where pubname = %s and schemaname = 'public'",
        [PUBLICATION],
    )
    published = {str(r[0]) for r in await cur.fetchall()}
    if "training_runs" not in published:
        return Check(
            "publication",
            "error",
            f"training_runs is not in the {PUBLICATION} publication: agents on the supabase backend "
            "and the web app's live updates hear no change (only the slow poll)",
            f"{MIGRATE_FIX}; or: alter publication {PUBLICATION} add table public.training_runs;",
        )
    if "trainer_workers" not in published:
        return Check(
            "publication",
            "warning",
            f"training_runs is in {PUBLICATION}, trainer_workers is not: an idle agent on the supabase "
            "backend cannot prove its Realtime stream is alive",
            f"{MIGRATE_FIX}; or: alter publication {PUBLICATION} add table public.trainer_workers;",
        )
    return Check("publication", "ok", f"training_runs and trainer_workers are in {PUBLICATION}")


async def _pg_events(conn: Conn, url: str, limits: Limits) -> Check:
    """The NOTIFY triggers exist, and a NOTIFY sent on one connection reaches a LISTEN on another."""
    cur = await conn.execute(
        "select tgname from pg_trigger where tgrelid = to_regclass('public.training_runs')"
        " and tgname = any(%s)",
        [list(NOTIFY_TRIGGERS)],
    )
    triggers = {str(r[0]) for r in await cur.fetchall()}
    missing = [t for t in NOTIFY_TRIGGERS if t not in triggers]
    if missing:
        return Check(
            "events",
            "error",
            f"the NOTIFY triggers on training_runs are missing ({', '.join(missing)}): agents hear new "
            "runs only through the slow poll",
            MIGRATE_FIX,
        )
    channel = f"saturnos_doctor_{uuid.uuid4().hex[:12]}"
    payload = uuid.uuid4().hex
    started = time.monotonic()
    try:
        async with await psycopg.AsyncConnection.connect(
            url, autocommit=True, connect_timeout=max(1, int(limits.connect_timeout))
        ) as listener:
            await listener.execute(sql.SQL("listen {}").format(sql.Identifier(channel)))
            await conn.execute("select pg_notify(%s, %s)", [channel, payload])
            async for notify in listener.notifies(timeout=limits.realtime_timeout):
                if notify.payload == payload:
                    elapsed = (time.monotonic() - started) * 1000
                    return Check("events", "ok", f"LISTEN/NOTIFY round trip in {elapsed:.0f} ms")
    except psycopg.Error as exc:
        return Check("events", "error", f"LISTEN failed: {exc}", "use a direct or session-mode connection")
    return Check(
        "events",
        "error",
        f"a NOTIFY did not reach a LISTEN on another connection within {limits.realtime_timeout:g}s",
        "connect directly or through a session-mode pooler: transaction-mode pooling drops notifications",
    )


# ---------------------------------------------------------------------------------------------
# Supabase (SUPABASE_URL): the REST calls, Realtime and Storage as the agent uses them


@dataclass(frozen=True)
class _Rest:
    """Result of one PostgREST call made by the doctor."""

    ok: bool
    code: str = ""
    message: str = ""
    unreachable: bool = False
    rows: list[dict[str, Any]] = field(default_factory=list)


async def _rest(call: Awaitable[Any], redact: Redactor) -> _Rest:
    from agent.backends.supabase.transport import ServerUnavailable

    try:
        response = await call
    except APIError as exc:
        return _Rest(False, str(exc.code or ""), redact(exc.message or exc))
    except ServerUnavailable as exc:
        return _Rest(False, str(exc.status), redact(exc), unreachable=True)
    except httpx.HTTPError as exc:
        return _Rest(False, type(exc).__name__, redact(exc) or type(exc).__name__, unreachable=True)
    data = getattr(response, "data", None)
    rows = [r for r in data if isinstance(r, dict)] if isinstance(data, list) else []
    return _Rest(True, rows=rows)


def _denied(result: _Rest) -> bool:
    return result.code == "42501" or "permission denied" in result.message.lower()


def _missing_table(result: _Rest) -> bool:
    return result.code in ("PGRST205", "42P01", "PGRST202")


def _bad_key(result: _Rest) -> bool:
    text = result.message.lower()
    return result.code in ("PGRST301", "PGRST302", "401") or "invalid api key" in text or "jws" in text


async def supabase_checks(settings: Settings, limits: Limits, redact: Redactor) -> list[Check]:
    from agent.backends.supabase import connect_client
    from agent.backends.supabase.transport import http_client

    url, key = settings.supabase_url, settings.supabase_service_role_key
    assert url is not None and key is not None
    role = jwt_role(key) or "service_role"
    http = http_client(timeout=limits.connect_timeout, connect_timeout=limits.connect_timeout)
    checks: list[Check] = []
    try:
        try:
            client = await connect_client(url, key, http)
        except Exception as exc:
            detail = f"cannot build the Supabase client: {redact(exc)}"
            return [Check("database", "error", detail, "check SUPABASE_URL")]
        started = time.monotonic()
        first = await _rest(client.table("training_runs").select("id").limit(1).execute(), redact)
        elapsed = (time.monotonic() - started) * 1000
        if first.unreachable:
            return [
                Check(
                    "database",
                    "error",
                    f"cannot reach the REST API at {url}: {first.message}",
                    "check SUPABASE_URL and that this host reaches it (proxy, firewall, DNS)",
                )
            ]
        if _bad_key(first):
            return [
                Check(
                    "database",
                    "error",
                    f"the REST API refused the key: {first.message}",
                    "set SUPABASE_SERVICE_ROLE_KEY to this project's service_role (secret) key",
                )
            ]
        checks.append(Check("database", "ok", f"REST API at {url} answered in {elapsed:.0f} ms"))
        schema, lacking = await _supabase_tables(client, redact)
        checks.append(schema)
        lacking += await _supabase_writes(client, settings, redact)
        if schema.level != "error" or lacking:
            checks.append(_rest_grants_check(role, lacking))
        checks += await _supabase_realtime(client, settings, limits, redact)
        checks += await _supabase_storage(client, http, settings, redact)
    finally:
        await http.aclose()
    return checks


@dataclass(frozen=True)
class _Denied:
    table: str
    privilege: Privilege
    message: str


def _rest_grants_check(role: str, lacking: Sequence[_Denied]) -> Check:
    if not lacking:
        return Check("grants", "ok", f"role {role} may read and write what the agent reads and writes")
    detail = "; ".join(f"role {role} has no {d.privilege} on {d.table} ({d.message})" for d in lacking)
    grants = " ".join(f"GRANT {d.privilege} ON public.{d.table} TO {role};" for d in lacking)
    return Check("grants", "error", detail, f"{MIGRATE_FIX}; or: {grants}")


async def _supabase_tables(client: AsyncClient, redact: Redactor) -> tuple[Check, list[_Denied]]:
    """The agent's SELECTs: both tables with every column it reads."""
    gaps: list[str] = []
    denied: list[_Denied] = []
    for table, columns in TABLES.items():
        result = await _rest(client.table(table).select(",".join(columns)).limit(1).execute(), redact)
        if result.ok:
            continue
        if _denied(result):
            denied.append(_Denied(table, "SELECT", result.message))
        elif _missing_table(result):
            gaps.append(f"table {table} is not exposed by the REST API ({result.code}: {result.message})")
        else:
            gaps.append(f"{table}: {result.code}: {result.message}")
    if gaps:
        return Check("schema", "error", "; ".join(gaps), MIGRATE_FIX), denied
    if denied:
        return Check("schema", "warning", "cannot read the tables to check their columns"), denied
    return Check("schema", "ok", "training_runs and trainer_workers have every column the agent uses"), denied


def _worker_row(settings: Settings, status: str) -> dict[str, Any]:
    return {
        "worker_id": settings.worker_id,
        "status": status,
        "last_seen": datetime.now(UTC).isoformat(),
        "host": socket.gethostname(),
        "version": __version__,
    }


async def _own_status(client: AsyncClient, settings: Settings, redact: Redactor) -> str:
    """This worker's status in the registry, kept as it is; `offline` for a worker not there yet."""
    query = client.table("trainer_workers").select("status").eq("worker_id", settings.worker_id)
    result = await _rest(query.limit(1).execute(), redact)
    if result.rows and isinstance(result.rows[0].get("status"), str):
        return str(result.rows[0]["status"])
    return "offline"


async def _write_own_row(client: AsyncClient, settings: Settings, redact: Redactor) -> _Rest:
    """Upsert this worker's own registry row (INSERT … ON CONFLICT UPDATE: both privileges)."""
    status = await _own_status(client, settings, redact)
    upsert = client.table("trainer_workers").upsert(_worker_row(settings, status), on_conflict="worker_id")
    return await _rest(upsert.execute(), redact)


async def _supabase_writes(client: AsyncClient, settings: Settings, redact: Redactor) -> list[_Denied]:
    """The agent's writes, with no effect: a PATCH of every column it writes that matches no run,
    and an upsert of this worker's own registry row."""
    denied: list[_Denied] = []
    nobody = str(uuid.UUID(int=0))
    body = {
        "status": "queued",
        "worker_id": None,
        "started_at": None,
        "heartbeat_at": None,
        "completed_at": None,
        "canceled_at": None,
        "error_message": None,
        "trained_model_url": None,
        "results": None,
    }
    patch = await _rest(client.table("training_runs").update(body).eq("id", nobody).execute(), redact)
    if _denied(patch):
        denied.append(_Denied("training_runs", "UPDATE", patch.message))
    upsert = await _write_own_row(client, settings, redact)
    if _denied(upsert):
        # The upsert needs both; say which one is missing when PostgREST's message tells.
        denied.append(_Denied("trainer_workers", "INSERT", upsert.message))
    return denied


async def _supabase_realtime(
    client: AsyncClient, settings: Settings, limits: Limits, redact: Redactor
) -> list[Check]:
    """Join as the agent does (the publication), then prove a change arrives (own worker row)."""
    from realtime import AsyncRealtimeClient

    from agent.backends.supabase import realtime_factory

    role = jwt_role(settings.supabase_service_role_key or "") or "service_role"
    realtime: AsyncRealtimeClient = realtime_factory(client, timeout=int(limits.realtime_timeout))()
    try:
        async with asyncio.timeout(limits.realtime_timeout):
            await realtime.connect()
    except Exception as exc:
        return [
            Check(
                "events",
                "error",
                f"cannot open the Realtime websocket: {redact(type(exc).__name__)}: {redact(exc)}",
                "check that Realtime is enabled for the project and that this host may open websockets to it",
            )
        ]
    try:
        runs = _Probe(realtime, f"saturnos-doctor-runs:{settings.worker_id}")
        runs.bind("training_runs", None)
        joined = await runs.join(limits.realtime_timeout)
        checks = [_publication_from_join("training_runs", joined, error_level="error")]
        workers = _Probe(realtime, f"saturnos-doctor-workers:{settings.worker_id}")
        workers.bind("trainer_workers", f"worker_id=eq.{settings.worker_id}")
        joined = await workers.join(limits.realtime_timeout)
        if joined is not None:
            checks.append(
                Check(
                    "events",
                    "warning" if "publication" in joined or "enabled" in joined else "error",
                    f"no Realtime round trip: the trainer_workers subscription failed: {redact(joined)}",
                    f"{MIGRATE_FIX} (it adds trainer_workers to {PUBLICATION})",
                )
            )
            return checks
        started = time.monotonic()
        written = await _write_own_row(client, settings, redact)
        if not written.ok:
            checks.append(
                Check("events", "error", f"cannot write this worker's row: {written.message}", MIGRATE_FIX)
            )
            return checks
        arrived = await workers.wait_change(limits.realtime_timeout)
        elapsed = (time.monotonic() - started) * 1000
        if arrived is True:
            checks.append(
                Check(
                    "events", "ok", f"this worker's row change arrived through Realtime in {elapsed:.0f} ms"
                )
            )
        elif arrived:
            checks.append(
                Check(
                    "events",
                    "error",
                    f"Realtime delivered an error instead of the change: {redact(arrived)}",
                    f"grant SELECT on trainer_workers to {role} and check its RLS policies; {MIGRATE_FIX}",
                )
            )
        else:
            checks.append(
                Check(
                    "events",
                    "error",
                    f"subscribed, but the write of this worker's row did not arrive within "
                    f"{limits.realtime_timeout:g}s",
                    f"check that role {role} may SELECT trainer_workers (grants, RLS), and the"
                    " project's Realtime quota (events per second) and logs; agents fall back to"
                    " the slow poll meanwhile",
                )
            )
        return checks
    finally:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(3):
                await realtime.close()


def _publication_from_join(table: str, joined: str | None, *, error_level: Level) -> Check:
    if joined is None:
        return Check("publication", "ok", f"Realtime subscribed to changes of {table}")
    return Check(
        "publication",
        error_level,
        f"Realtime refused the subscription to {table}: {joined}",
        f"{MIGRATE_FIX} (it adds {table} to the {PUBLICATION} publication); a project that allows only "
        "private channels must allow public ones",
    )


def _server_message(error: Exception | None) -> str:
    """The `message` of a Realtime error payload, which realtime-py wraps whole in the exception."""
    if error is None:
        return "no reason given"
    payload: object = error.args[0] if error.args else None
    if not isinstance(payload, dict):
        with contextlib.suppress(ValueError):
            payload = json.loads(str(error))
    if isinstance(payload, dict) and payload.get("message"):
        return str(payload["message"])
    return str(error)


class _Probe:
    """One Realtime channel of the doctor: joined, then waiting for one change or an error."""

    def __init__(self, realtime: Any, topic: str) -> None:
        self._channel = realtime.channel(topic)
        self._subscribed = asyncio.Event()
        self._outcome: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._change: asyncio.Future[bool | str] = asyncio.get_running_loop().create_future()

    def bind(self, table: str, filter_: str | None) -> None:
        from realtime.types import RealtimePostgresChangesListenEvent as Event

        for event in (Event.Insert, Event.Update):
            self._channel.on_postgres_changes(
                event, self._on_change, table=table, schema="public", filter=filter_
            )
        self._channel.on_system(self._on_system)

    def _settle(self, future: asyncio.Future[Any], value: object) -> None:
        if not future.done():
            future.set_result(value)

    def _on_system(self, payload: Any) -> None:
        message = str(getattr(payload, "message", ""))
        if getattr(payload, "extension", "") == "postgres_changes" and "Subscribed to PostgreSQL" in message:
            self._settle(self._outcome, None)

    def _on_status(self, status: Any, error: Exception | None) -> None:
        from realtime import RealtimeSubscribeStates

        if status != RealtimeSubscribeStates.SUBSCRIBED:
            state = getattr(status, "value", status)
            self._settle(self._outcome, f"channel {state}: {_server_message(error)}")

    def _on_change(self, payload: Any) -> None:
        data = payload.get("data") if isinstance(payload, dict) else None
        errors = data.get("errors") if isinstance(data, dict) else None
        self._settle(self._change, str(errors) if errors else True)

    async def join(self, deadline: float) -> str | None:
        """None once changes flow ("Subscribed to PostgreSQL"); else the server's reason."""
        try:
            async with asyncio.timeout(deadline):
                await self._channel.subscribe(self._on_status)
                return await self._outcome
        except TimeoutError:
            return f'no "Subscribed to PostgreSQL" within {deadline:g}s'
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"

    async def wait_change(self, deadline: float) -> bool | str:
        """True when the change arrived, the server's errors when it sent those instead, else False."""
        try:
            async with asyncio.timeout(deadline):
                return await self._change
        except TimeoutError:
            return False


async def _supabase_storage(
    client: AsyncClient, http: httpx.AsyncClient, settings: Settings, redact: Redactor
) -> list[Check]:
    bucket = settings.supabase_artifacts_bucket
    storage = client.storage
    checks: list[Check] = []
    try:
        info = await storage.get_bucket(bucket)
    except (StorageException, httpx.HTTPError) as exc:
        text = redact(getattr(exc, "message", None) or exc)
        missing = "not found" in text.lower() or "404" in text
        kind = "private" if settings.artifact_url_mode == "signed" else "public"
        return [
            Check(
                "storage",
                "error",
                f"artifacts bucket {bucket!r} {'does not exist' if missing else 'cannot be read'}: {text}",
                f"create the bucket {bucket!r} ({kind}), or set SUPABASE_ARTIFACTS_BUCKET to an existing one",
            )
        ]
    problems: list[str] = []
    fix = ""
    if settings.artifact_url_mode == "public" and not getattr(info, "public", False):
        problems.append(f"bucket {bucket!r} is private, but ARTIFACT_URL_MODE=public writes public URLs")
        fix = f"make bucket {bucket!r} public, or set ARTIFACT_URL_MODE=signed"
    key = f"{PROBE_PREFIX}/{settings.worker_id}-{uuid.uuid4().hex[:8]}.bin"
    payload = os.urandom(64)
    files = storage.from_(bucket)
    step = "upload"
    try:
        await files.upload(key, payload, {"content-type": "application/octet-stream", "upsert": "true"})
        try:
            step = "sign"
            if settings.artifact_url_mode == "signed":
                signed = await files.create_signed_url(key, 60)
                link = str(signed.get("signedURL") or signed.get("signedUrl") or "")
            else:
                link = str(await files.get_public_url(key))
            step = "download"
            # As the web app does: the URL alone, without the service key.
            response = await http.get(link, headers={"Authorization": "", "apikey": ""})
            if response.status_code != 200 or response.content != payload:
                problems.append(
                    f"the {settings.artifact_url_mode} URL of a probe object does not download it "
                    f"(HTTP {response.status_code})"
                )
                fix = fix or f"make bucket {bucket!r} public, or set ARTIFACT_URL_MODE=signed"
        finally:
            step = "delete"
            await files.remove([key])
    except (StorageException, httpx.HTTPError) as exc:
        text = redact(getattr(exc, "message", None) or exc)
        status = str(getattr(exc, "status", "")) if isinstance(exc, StorageApiError) else ""
        return [
            Check(
                "storage",
                "error",
                f"cannot {step} a probe object in bucket {bucket!r}: {status + ' ' if status else ''}{text}",
                (
                    "let the service role write the bucket: no file size or MIME type limit that refuses "
                    "weights (application/octet-stream), CSV or PNG files, and storage policies that allow it"
                ),
            )
        ]
    if problems:
        checks.append(Check("storage", "error", "; ".join(problems), fix))
    else:
        checks.append(
            Check(
                "storage",
                "ok",
                f"bucket {bucket!r}: a probe uploaded, read by its {settings.artifact_url_mode} URL, deleted",
            )
        )
    try:
        await storage.get_bucket(settings.supabase_datasets_bucket)
    except (StorageException, httpx.HTTPError):
        checks.append(
            Check(
                "storage",
                "warning",
                f"datasets bucket {settings.supabase_datasets_bucket!r} cannot be read: "
                "`storage:` dataset URIs that name no bucket will fail",
                "create it, or set SUPABASE_DATASETS_BUCKET to the bucket that holds the datasets",
            )
        )
    return checks


# ---------------------------------------------------------------------------------------------
# This host


def check_local_storage(settings: Settings) -> Check:
    """The folders the agent writes: each created if missing, then a probe written, read and removed."""
    folders = [("RUNS_DIR", settings.runs_root), ("DATASET_CACHE_DIR", settings.cache_root)]
    local_artifacts = settings.backend != "supabase"
    if local_artifacts:
        folders.insert(0, ("ARTIFACTS_DIR", settings.artifacts_root))
    name_of_check = "storage" if local_artifacts else "folders"
    for name, folder in folders:
        probe = folder / f".{PROBE_PREFIX}-{uuid.uuid4().hex[:8]}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"probe")
            if probe.read_bytes() != b"probe":
                raise OSError("read back different bytes")
        except OSError as exc:
            return Check(
                name_of_check,
                "error",
                f"{name} {folder} is not writable: {exc.strerror or exc}",
                f"give the agent's user write access to {folder}, or point {name} elsewhere",
            )
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()
    written = ", ".join(str(folder) for _, folder in folders)
    return Check(name_of_check, "ok", f"writable: {written}")


def check_gpus() -> Check:
    out = nvidia_smi(
        ["--query-gpu=index,name,memory.total,memory.used,driver_version", "--format=csv,noheader,nounits"],
        timeout=10,
    )
    if out is None:
        return Check(
            "gpus",
            "warning",
            "no nvidia-smi: no NVIDIA GPU or driver on this host, runs train on the CPU",
            "install the NVIDIA driver (in containers, the NVIDIA container toolkit), or accept CPU training",
        )
    if out.returncode != 0:
        message = (out.stderr or out.stdout).strip().splitlines()
        return Check(
            "gpus",
            "error",
            f"nvidia-smi failed: {message[0] if message else f'exit {out.returncode}'}",
            "check the NVIDIA driver (reboot after a driver upgrade; the container runtime's GPU access)",
        )
    gpus = []
    for line in out.stdout.strip().splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) >= 5:
            index, name, total, used, driver = fields[:5]
            gpus.append(f"{index}: {name}, {used}/{total} MiB used (driver {driver})")
    if not gpus:
        return Check("gpus", "warning", "nvidia-smi lists no GPU: runs train on the CPU", "check the driver")
    return Check("gpus", "ok", "; ".join(gpus))


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_training_libraries() -> Check:
    """torch, torchvision and ultralytics as installed, read from their metadata (never imported here)."""
    versions = {name: _version(name) for name in ("torch", "torchvision", "ultralytics")}
    missing = [n for n, v in versions.items() if v is None]
    text = ", ".join(f"{n} {v}" for n, v in versions.items() if v)
    if missing:
        return Check(
            "training",
            "error",
            f"not installed: {', '.join(missing)}" + (f" (found {text})" if text else ""),
            "install the agent with its dependencies: pip install .",
        )
    torch = versions["torch"] or ""
    if "+cpu" in torch and shutil.which("nvidia-smi"):
        return Check(
            "training",
            "error",
            f"{text}: torch is a CPU-only build on a host with NVIDIA GPUs",
            "install a CUDA build of torch (the index URL for your CUDA version on pytorch.org)",
        )
    return Check("training", "ok", text)


async def check_network(settings: Settings) -> tuple[bool, Check]:
    from agent.wiring import detect_offline

    offline = await detect_offline(settings)
    how = "probed at start" if settings.offline is None else f"OFFLINE={int(settings.offline)}"
    if offline:
        return offline, Check(
            "network",
            "ok",
            f"offline ({how}): no weight downloads or pip installs by ultralytics",
        )
    return offline, Check("network", "ok", f"online ({how}): missing pretrained weights are downloaded")


def check_weights(settings: Settings, offline: bool) -> Check:
    folder = settings.weights_dir
    if folder is not None and not folder.is_dir():
        return Check(
            "weights",
            "error",
            f"WEIGHTS_DIR {folder} does not exist",
            f"create {folder} and put the .pt files there, or unset WEIGHTS_DIR",
        )
    wanted = [model_reference(name, task, True) for name in MODEL_NAMES for task in ("detect", "segment")]
    found = [w for w in wanted if folder is not None and (folder / w).is_file()]
    missing = [w for w in wanted if w not in found]
    where = f"in WEIGHTS_DIR {folder}" if folder is not None else "(WEIGHTS_DIR not set)"
    have = f"{len(found)} of {len(wanted)} known weights {where}" + (f": {', '.join(found)}" if found else "")
    if not missing:
        return Check("weights", "ok", have)
    if offline:
        return Check(
            "weights",
            "warning",
            f"{have}; offline, so runs asking for {', '.join(missing)} fail unless they train from scratch",
            "copy the .pt files your users ask for into WEIGHTS_DIR (e.g. yolov8s.pt, yolov8s-seg.pt)",
        )
    return Check("weights", "ok", f"{have}; the others are downloaded on first use")


def _existing(path: Path) -> Path:
    path = path.expanduser()
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def check_disk(settings: Settings, limits: Limits) -> Check:
    seen: dict[int, tuple[str, Path]] = {}
    for name, folder in (
        ("DATA_DIR", settings.data_dir),
        ("RUNS_DIR", settings.runs_root),
        ("DATASET_CACHE_DIR", settings.cache_root),
    ):
        where = _existing(folder)
        seen.setdefault(where.stat().st_dev, (name, where))
    worst: Level = "ok"
    parts = []
    for name, where in seen.values():
        free = shutil.disk_usage(where).free / 2**30
        parts.append(f"{name} {where}: {free:.1f} GiB free")
        if free < limits.disk_error_gib:
            worst = "error"
        elif free < limits.disk_warning_gib and worst == "ok":
            worst = "warning"
    fix = (
        ""
        if worst == "ok"
        else ("free space (old workspaces in RUNS_DIR, the dataset cache), or move DATA_DIR to a bigger disk")
    )
    return Check("disk", worst, "; ".join(parts), fix)
