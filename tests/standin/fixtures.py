"""The `standin` pytest fixture: a stand-in project over the test's fresh database, migrated."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from agent.backends.postgres.migrate import migrate
from tests.standin.server import StandIn


async def start_project(database_url: str, storage_dir: Path, **options: Any) -> StandIn:
    """A running stand-in on which the saturnos-agent migration was applied, as an operator does.

    The stand-in grants nothing by default, as today's Supabase: the migration, run once the
    project's API roles and publication exist, grants what the agent and the app use and puts both
    tables in `supabase_realtime`.
    """
    server = StandIn(database_url, storage_dir, **options)
    await server.start()
    try:
        await migrate(database_url)
        await server.sync_triggers()
    except BaseException:
        await server.stop()
        raise
    return server


@asynccontextmanager
async def running_project(database_url: str, storage_dir: Path, **options: Any) -> AsyncIterator[StandIn]:
    server = await start_project(database_url, storage_dir, **options)
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def standin(database_url: str, tmp_path: Path) -> AsyncIterator[StandIn]:
    """A running, migrated stand-in: both agent tables granted and in `supabase_realtime`."""
    async with running_project(database_url, tmp_path / "storage") as server:
        yield server
