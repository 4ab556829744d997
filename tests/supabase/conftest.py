"""Fixtures: the stand-in Supabase project and the supabase backend opened against it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.backends.supabase import SupabaseBackends, open_supabase
from tests.standin import StandIn
from tests.supabase.harness import FAST, settings_for


@pytest.fixture
async def supa(standin: StandIn, tmp_path: Path) -> AsyncIterator[SupabaseBackends]:
    """The supabase backend of one agent, with fast supervisor timings."""
    backends = await open_supabase(settings_for(standin, tmp_path / "agent"), tuning=FAST)
    try:
        yield backends
    finally:
        await backends.close()
