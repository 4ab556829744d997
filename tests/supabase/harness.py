"""The supabase backend under the port contract suite: a stand-in project over the test database."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from agent.backends.supabase import (
    SupabaseBackends,
    SupabaseEvents,
    SupabaseStore,
    Tuning,
    connect_client,
    open_supabase,
    realtime_factory,
)
from agent.backends.supabase.transport import http_client
from agent.config import Settings
from agent.ports import BlobStore
from tests.standin import StandIn
from tests.standin.fixtures import running_project

# Fast supervisor timings, so that outages and recoveries fit in a test.
FAST = Tuning(
    check_interval=0.05,
    heartbeat_interval=0.5,
    heartbeat_timeout=1.0,
    reconnect_grace=0.5,
    rejoin_grace=1.0,
    join_timeout=5.0,
    postgres_timeout=10.0,
    close_timeout=1.0,
    initial_backoff=0.05,
    max_backoff=0.5,
    stable_after=1.0,
)
_topics = itertools.count(1)


def settings_for(server: StandIn, data_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "supabase_url": server.url,
        "supabase_service_role_key": server.service_role_key,
        "data_dir": data_dir,
        "worker_id": "test-worker",
        "allow_fake_trainer": True,
        **overrides,
    }
    return Settings(**values)


@asynccontextmanager
async def running_standin(database_url: str, storage_dir: Path) -> AsyncIterator[StandIn]:
    """The stand-in as the `standin` fixture starts it, for factories that get only sync fixtures."""
    async with running_project(database_url, storage_dir) as server:
        yield server


class SupabaseHarness:
    """Harness of tests/contract/conftest.py: the backend, a second agent's store, direct SQL."""

    name = "supabase"
    follows_per_run = True

    def __init__(self, server: StandIn, backends: SupabaseBackends) -> None:
        self.server = server
        self.backends = backends
        self.store: SupabaseStore = backends.store  # type: ignore[assignment]
        self._closers: list[Callable[[], Awaitable[None]]] = []
        self._client = None

    async def _client_for(self) -> Any:
        http = http_client()
        self._closers.append(http.aclose)
        return await connect_client(self.server.url, self.server.service_role_key, http)

    async def another_store(self) -> SupabaseStore:
        return SupabaseStore(await self._client_for())

    def events(self) -> SupabaseEvents:
        http = http_client()
        self._closers.append(http.aclose)
        from supabase import AsyncClient, AsyncClientOptions

        client = AsyncClient(
            self.server.url, self.server.service_role_key, AsyncClientOptions(httpx_client=http)
        )
        # The contract's runs are claimed by "w1": listen as that agent does.
        return SupabaseEvents(
            realtime_factory(client), topic=f"contract-{next(_topics)}", worker_id="w1", tuning=FAST
        )

    def _sql(self) -> Any:
        # Direct row access is the postgres harness's, on the same database.
        from tests.contract.conftest import PostgresHarness

        return PostgresHarness(self.server.database_url, None)  # type: ignore[arg-type]

    async def insert_row(self, **fields: Any) -> str:
        run_id: str = await self._sql().insert_row(**fields)
        return run_id

    async def set_fields(self, run_id: str, **fields: Any) -> None:
        await self._sql().set_fields(run_id, **fields)

    async def make_stale(self, run_id: str, seconds: float) -> None:
        await self._sql().make_stale(run_id, seconds)

    async def worker_row(self, worker_id: str) -> dict[str, Any] | None:
        row: dict[str, Any] | None = await self._sql().worker_row(worker_id)
        return row

    async def age_worker(self, worker_id: str, seconds: float) -> None:
        await self._sql().age_worker(worker_id, seconds)

    async def run_columns(self, run_id: str, *names: str) -> dict[str, Any]:
        columns: dict[str, Any] = await self._sql().run_columns(run_id, *names)
        return columns

    async def delete_row(self, run_id: str) -> None:
        await self._sql().delete_row(run_id)

    async def close(self) -> None:
        for close in reversed(self._closers):
            await close()
        await self.backends.close()


@asynccontextmanager
async def supabase_harness(fixtures: dict[str, Any]) -> AsyncIterator[SupabaseHarness]:
    """Factory for STORES: needs the `database_url` and `tmp_path` fixtures."""
    tmp: Path = fixtures["tmp_path"]
    async with running_standin(fixtures["database_url"], tmp / "standin-storage") as server:
        backends = await open_supabase(settings_for(server, tmp / "agent"), tuning=FAST)
        harness = SupabaseHarness(server, backends)
        try:
            yield harness
        finally:
            await harness.close()


@asynccontextmanager
async def supabase_blobs(fixtures: dict[str, Any]) -> AsyncIterator[BlobStore]:
    """Factory for BLOBS: public URLs, stable across uploads of one key as the contract wants."""
    tmp: Path = fixtures["tmp_path"]
    async with running_standin(fixtures["database_url"], tmp / "standin-storage") as server:
        backends = await open_supabase(settings_for(server, tmp / "agent"), tuning=FAST)
        try:
            yield backends.blobs
        finally:
            await backends.close()
