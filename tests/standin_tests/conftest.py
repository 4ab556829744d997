"""Fixtures for the stand-in's own tests: the official clients, pointed at the stand-in."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from realtime import AsyncRealtimeChannel, AsyncRealtimeClient, RealtimeSubscribeStates
from supabase import AsyncClient, acreate_client

from tests.standin.server import StandIn
from tests.util import wait_for


@pytest.fixture
async def supabase(standin: StandIn) -> AsyncIterator[AsyncClient]:
    """The official async client with the service-role key."""
    client = await acreate_client(standin.url, standin.service_role_key)
    try:
        yield client
    finally:
        await client.realtime.close()
        await client.postgrest.aclose()
        await client.storage.session.aclose()


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[psycopg.AsyncConnection[tuple[Any, ...]]]:
    """A direct connection, for writes that do not go through the stand-in (as the web app's would)."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        yield conn


@dataclass
class Recorder:
    """What a channel's callbacks saw."""

    changes: list[dict[str, Any]] = field(default_factory=list)
    states: list[RealtimeSubscribeStates] = field(default_factory=list)
    system: list[Any] = field(default_factory=list)

    def on_change(self, payload: Any) -> None:
        self.changes.append(payload)

    def on_state(self, state: RealtimeSubscribeStates, _error: Exception | None) -> None:
        self.states.append(state)

    def on_system(self, payload: Any) -> None:
        self.system.append(payload)

    def subscribed_to_postgres(self) -> int:
        return sum(1 for p in self.system if p.message == "Subscribed to PostgreSQL")

    def of_type(self, type_: str) -> list[dict[str, Any]]:
        return [c for c in self.changes if c["data"]["type"] == type_]


async def subscribe(
    client: AsyncRealtimeClient,
    bindings: list[dict[str, Any]],
    topic: str = "test",
    *,
    wait_system: bool = True,
) -> tuple[AsyncRealtimeChannel, Recorder]:
    """A channel with `postgres_changes` bindings, subscribed; waits for "Subscribed to PostgreSQL"."""
    recorder = Recorder()
    channel = client.channel(topic)
    for binding in bindings:
        channel.on_postgres_changes(callback=recorder.on_change, **binding)
    channel.on_system(recorder.on_system)
    await channel.subscribe(recorder.on_state)
    if wait_system:
        await wait_for(
            lambda: recorder.subscribed_to_postgres() >= 1, timeout=5, what="Subscribed to PostgreSQL"
        )
    return channel, recorder


@pytest.fixture
async def realtime_client(standin: StandIn) -> AsyncIterator[AsyncRealtimeClient]:
    """A realtime client as the supabase client builds it, with short reconnect backoffs."""
    client = AsyncRealtimeClient(f"{standin.url}/realtime/v1", standin.service_role_key, initial_backoff=0.1)
    try:
        yield client
    finally:
        await client.close()
