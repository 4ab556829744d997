"""Backends under contract: every contract test runs against each factory in STORES or BLOBS."""

# A new backend joins the suite with one Factory: in STORES (yielding a Harness: the store, its
# events, and direct row access for odd set-ups) or in BLOBS.

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, Protocol, TypeVar

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from agent.backends.local.blobs import LocalBlobs
from agent.backends.memory import MemoryBlobs, MemoryEvents, MemoryStore
from agent.backends.postgres.events import PostgresEvents
from agent.backends.postgres.store import PostgresStore
from agent.domain.run import Hint
from agent.ports import BlobStore, RunAdmin, RunEvents, RunStore
from tests.supabase.harness import supabase_blobs, supabase_harness
from tests.util import wait_for

T = TypeVar("T")


class Store(RunStore, RunAdmin, Protocol):
    """Both sides of the table, as every backend store implements them."""


class Harness(Protocol):
    """A backend under test plus the direct access a test needs to set up odd rows."""

    name: str
    store: Store
    # Its events follow each held run on a feed of its own, which says it is live with a CHECK.
    follows_per_run: bool

    async def another_store(self) -> Store:
        """A second agent's store on the same data (closed by the harness)."""
        ...

    def events(self) -> RunEvents: ...

    async def insert_row(self, **fields: Any) -> str:
        """Insert a row directly, bypassing the store (legacy rows, unknown statuses)."""
        ...

    async def set_fields(self, run_id: str, **fields: Any) -> None:
        """UPDATE columns directly, as the web app or a person with SQL would."""
        ...

    async def make_stale(self, run_id: str, seconds: float) -> None:
        """Backdate the run's heartbeat by `seconds`."""
        ...

    async def worker_row(self, worker_id: str) -> dict[str, Any] | None: ...

    async def age_worker(self, worker_id: str, seconds: float) -> None:
        """Move the worker's last_seen `seconds` into the past."""
        ...

    async def run_columns(self, run_id: str, *names: str) -> dict[str, Any]:
        """Columns of a run that RunRow does not carry (run_name, project_id, step_id)."""
        ...

    async def delete_row(self, run_id: str) -> None:
        """DELETE the run, as the web app's delete button does."""
        ...


@dataclass
class MemoryHarness:
    name: str = "memory"
    store: MemoryStore = field(default_factory=MemoryStore)
    follows_per_run: bool = False

    async def another_store(self) -> Store:
        return self.store

    def events(self) -> RunEvents:
        return MemoryEvents(self.store)

    async def insert_row(self, **fields: Any) -> str:
        return self.store.insert_row(**fields)

    async def set_fields(self, run_id: str, **fields: Any) -> None:
        self.store.set_fields(run_id, **fields)

    async def make_stale(self, run_id: str, seconds: float) -> None:
        self.store.set_fields(run_id, heartbeat_at=self.store.clock() - timedelta(seconds=seconds))

    async def worker_row(self, worker_id: str) -> dict[str, Any] | None:
        rec = self.store.workers.get(worker_id)
        return None if rec is None else dict(vars(rec))

    async def age_worker(self, worker_id: str, seconds: float) -> None:
        self.store.workers[worker_id].last_seen -= timedelta(seconds=seconds)

    async def run_columns(self, run_id: str, *names: str) -> dict[str, Any]:
        rec = self.store.runs[run_id]
        return {n: getattr(rec, n) for n in names}

    async def delete_row(self, run_id: str) -> None:
        self.store.delete_row(run_id)


def _sql_value(name: str, value: Any) -> Any:
    return Jsonb(value) if name in ("configuration", "results") else value


@dataclass
class PostgresHarness:
    url: str
    store: PostgresStore
    name: str = "postgres"
    _extra: list[PostgresStore] = field(default_factory=list)
    app_schema: bool = False  # the web app's schema: every row needs a run_name
    follows_per_run: bool = False

    async def another_store(self) -> Store:
        store = await PostgresStore.connect(self.url)
        self._extra.append(store)
        return store

    def events(self) -> RunEvents:
        return PostgresEvents(self.url, health_interval=1.0, initial_backoff=0.05, max_backoff=0.5)

    async def _execute(self, query: sql.Composable | str, params: list[Any]) -> list[dict[str, Any]]:
        conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True, row_factory=dict_row)
        async with conn:
            cur = await conn.execute(query, params)  # type: ignore[arg-type]
            return await cur.fetchall() if cur.description else []

    async def insert_row(self, **fields: Any) -> str:
        if self.app_schema:
            fields.setdefault("run_name", "contract run")
            # Its cancel_requested is `not null default false`: a legacy null cannot exist there.
            if "cancel_requested" in fields and fields["cancel_requested"] is None:
                del fields["cancel_requested"]
        names = list(fields)
        query = sql.SQL("insert into training_runs ({}) values ({}) returning id").format(
            sql.SQL(", ").join(map(sql.Identifier, names)), sql.SQL(", ").join(sql.Placeholder() * len(names))
        )
        if not names:
            query = sql.SQL("insert into training_runs default values returning id")
        rows = await self._execute(query, [_sql_value(n, fields[n]) for n in names])
        return str(rows[0]["id"])

    async def set_fields(self, run_id: str, **fields: Any) -> None:
        assignments = sql.SQL(", ").join(
            sql.SQL("{} = {}").format(sql.Identifier(n), sql.Placeholder()) for n in fields
        )
        query = sql.SQL("update training_runs set {} where id = {}").format(assignments, sql.Placeholder())
        await self._execute(query, [*(_sql_value(n, v) for n, v in fields.items()), run_id])

    async def make_stale(self, run_id: str, seconds: float) -> None:
        await self._execute(
            "update training_runs set heartbeat_at = now() - make_interval(secs => %s) where id = %s",
            [float(seconds), run_id],
        )

    async def worker_row(self, worker_id: str) -> dict[str, Any] | None:
        rows = await self._execute("select * from trainer_workers where worker_id = %s", [worker_id])
        return rows[0] if rows else None

    async def age_worker(self, worker_id: str, seconds: float) -> None:
        await self._execute(
            "update trainer_workers set last_seen = last_seen - make_interval(secs => %s)"
            " where worker_id = %s",
            [float(seconds), worker_id],
        )

    async def run_columns(self, run_id: str, *names: str) -> dict[str, Any]:
        query = sql.SQL("select {} from training_runs where id = %s").format(
            sql.SQL(", ").join(map(sql.Identifier, names))
        )
        rows = await self._execute(query, [run_id])
        return {k: str(v) if isinstance(v, uuid.UUID) else v for k, v in rows[0].items()}

    async def delete_row(self, run_id: str) -> None:
        await self._execute("delete from training_runs where id = %s", [run_id])

    async def close(self) -> None:
        for store in (*self._extra, self.store):
            await store.close()


@dataclass(frozen=True)
class Factory(Generic[T]):
    """How to open one backend: the (sync) fixtures it needs, and an async context that yields it."""

    open: Callable[[dict[str, Any]], AbstractAsyncContextManager[T]]
    fixtures: tuple[str, ...] = ()


@asynccontextmanager
async def memory_harness(fixtures: dict[str, Any]) -> AsyncIterator[Harness]:
    yield MemoryHarness()


@asynccontextmanager
async def postgres_harness(fixtures: dict[str, Any]) -> AsyncIterator[Harness]:
    url: str = fixtures["database_url"]
    harness = PostgresHarness(url, await PostgresStore.connect(url))
    try:
        yield harness
    finally:
        await harness.close()


@asynccontextmanager
async def postgres_app_harness(fixtures: dict[str, Any]) -> AsyncIterator[Harness]:
    url: str = fixtures["app_database_url"]
    harness = PostgresHarness(url, await PostgresStore.connect(url), name="postgres-app", app_schema=True)
    try:
        yield harness
    finally:
        await harness.close()


STORES: dict[str, Factory[Harness]] = {
    "memory": Factory(memory_harness),
    "postgres": Factory(postgres_harness, ("database_url",)),
    # The same backend on a database with the web app's own schema under the agent's.
    "postgres-app": Factory(postgres_app_harness, ("app_database_url",)),
    "supabase": Factory(supabase_harness, ("database_url", "tmp_path")),
}


@asynccontextmanager
async def memory_blobs(fixtures: dict[str, Any]) -> AsyncIterator[BlobStore]:
    yield MemoryBlobs()


@asynccontextmanager
async def local_blobs(fixtures: dict[str, Any]) -> AsyncIterator[BlobStore]:
    yield LocalBlobs(fixtures["tmp_path"] / "artifacts")


BLOBS: dict[str, Factory[BlobStore]] = {
    "memory": Factory(memory_blobs),
    "local": Factory(local_blobs, ("tmp_path",)),
    "supabase": Factory(supabase_blobs, ("database_url", "tmp_path")),
}


def _resolve(request: pytest.FixtureRequest, factory: Factory[Any]) -> dict[str, Any]:
    # Sync fixtures (the test Postgres) are set up here, outside the event loop.
    return {name: request.getfixturevalue(name) for name in factory.fixtures}


@pytest.fixture(params=list(STORES))
def _store_fixtures(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    return request.param, _resolve(request, STORES[request.param])


@pytest.fixture
async def backend(_store_fixtures: tuple[str, dict[str, Any]]) -> AsyncIterator[Harness]:
    name, fixtures = _store_fixtures
    async with STORES[name].open(fixtures) as harness:
        yield harness


@pytest.fixture(params=list(BLOBS))
def _blob_fixtures(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    return request.param, _resolve(request, BLOBS[request.param])


@pytest.fixture
async def blobs(_blob_fixtures: tuple[str, dict[str, Any]]) -> AsyncIterator[BlobStore]:
    name, fixtures = _blob_fixtures
    async with BLOBS[name].open(fixtures) as store:
        yield store


@dataclass
class Listener:
    """Collects the hints and subscriptions of one running `listen`."""

    events: RunEvents
    failing: bool = False  # the sink raises after recording each hint
    hints: list[Hint] = field(default_factory=list)
    subscriptions: int = 0

    def sink(self, hint: Hint) -> None:
        self.hints.append(hint)
        if self.failing:
            raise RuntimeError("sink failure")

    def subscribed(self) -> None:
        self.subscriptions += 1

    def for_run(self, run_id: str) -> list[Hint]:
        return [h for h in self.hints if h.run_id == run_id]

    def changes(self, run_id: str) -> list[Hint]:
        """The run's hints that carry a change (not a feed's CHECK)."""
        return [h for h in self.for_run(run_id) if h.op != "CHECK"]

    async def hold(self, backend: Harness, run_id: str) -> None:
        """Follow `run_id` as the core does once it holds it; return when its changes will arrive."""
        self.events.follow(frozenset({run_id}))
        if backend.follows_per_run:
            await wait_for(lambda: [h for h in self.for_run(run_id) if h.op == "CHECK"], what="feed live")


@asynccontextmanager
async def listening(events: RunEvents, failing: bool = False) -> AsyncIterator[Listener]:
    """Run `events.listen` in a task until the block ends; starts once subscribed."""
    listener = Listener(events, failing=failing)
    task = asyncio.create_task(events.listen(listener.sink, listener.subscribed))
    try:
        await wait_for(lambda: listener.subscriptions >= 1 or task.done(), timeout=10, what="subscribed")
        if task.done():
            task.result()
        yield listener
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def utc(seconds_ago: float = 0.0) -> datetime:
    return datetime.now(UTC) - timedelta(seconds=seconds_ago)
