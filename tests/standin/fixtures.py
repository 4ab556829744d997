"""The `standin` pytest fixture: a stand-in over the test's fresh, migrated database."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.standin.server import StandIn


@pytest.fixture
async def standin(database_url: str, tmp_path: Path) -> AsyncIterator[StandIn]:
    """A running stand-in; `public.training_runs` is in `supabase_realtime`, where the migration puts it."""
    server = StandIn(database_url, tmp_path / "storage")
    await server.start()
    await server.publish("public.training_runs")
    try:
        yield server
    finally:
        await server.stop()
