"""Postgres only: lost connections, on the LISTEN side and the store side."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import psycopg
import pytest
from loguru import logger

from agent.backends.postgres.events import PostgresEvents
from agent.backends.postgres.store import PostgresStore
from agent.domain.errors import BackendError, BackendUnavailable
from agent.domain.run import NewRun
from tests.contract.conftest import listening
from tests.pg import TEMPLATE
from tests.util import wait_for

if TYPE_CHECKING:
    from tests.pg import TestPostgres

NEW = NewRun("/data/a.yaml", "YOLOv8n", {"epochs": 1})


@pytest.fixture
def log_messages() -> Iterator[list[str]]:
    messages: list[str] = []
    handler = logger.add(lambda m: messages.append(m.record["message"]), level="DEBUG", diagnose=False)
    yield messages
    logger.remove(handler)


def terminate(url: str, application_name: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "select pg_terminate_backend(pid) from pg_stat_activity"
            " where datname = current_database() and application_name = %s and pid <> pg_backend_pid()",
            (application_name,),
        ).fetchall()
    return sum(1 for (ok,) in rows if ok)


def fast_events(url: str) -> PostgresEvents:
    return PostgresEvents(url, health_interval=1.0, initial_backoff=0.05, max_backoff=0.5)


async def test_listen_survives_pg_terminate_backend(database_url: str, log_messages: list[str]) -> None:
    store = await PostgresStore.connect(database_url)
    events = fast_events(database_url)
    inserted: list[str] = []
    try:
        async with listening(events) as listener:

            async def insert(n: int) -> None:
                for _ in range(n):
                    inserted.append(await store.submit(NEW))

            producer = asyncio.create_task(insert(40))
            await wait_for(lambda: len(inserted) >= 5, what="first inserts")
            killed = await asyncio.to_thread(terminate, database_url, "saturnos-agent listen")
            assert killed == 1
            await producer

            await wait_for(lambda: listener.subscriptions >= 2, what="re-LISTEN with a catch-up call")
            await wait_for(lambda: events.healthy, what="healthy again")
            later = [await store.submit(NEW) for _ in range(5)]
            await wait_for(lambda: all(listener.for_run(r) for r in later), what="hints after reconnect")

        # Hints for runs inserted while the connection was down may be lost; the catch-up poll
        # that on_subscribed triggers finds every one of them.
        missed = {r for r in inserted if not listener.for_run(r)}
        assert missed <= set((await store.poll(100)).claimable)
        assert "listen connection lost" in log_messages
        assert log_messages.count("listening") >= 2
    finally:
        await store.close()


async def test_listen_waits_with_backoff_for_an_unreachable_database(
    pg_server: TestPostgres, log_messages: list[str]
) -> None:
    name = f"late_{uuid.uuid4().hex[:12]}"
    url = pg_server.url(name)
    events = fast_events(url)
    task = asyncio.create_task(events.listen(lambda h: None, lambda: None))
    try:
        await wait_for(lambda: log_messages.count("listen reconnect failed") >= 2, what="failed attempts")
        assert events.healthy is False
        with psycopg.connect(pg_server.url("postgres"), autocommit=True) as conn:
            conn.execute(f"create database {name} template {TEMPLATE}")
        await wait_for(lambda: events.healthy, what="subscribed once the database exists")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert events.healthy is False


async def test_store_reconnects_on_the_call_after_a_lost_connection(database_url: str) -> None:
    store = await PostgresStore.connect(database_url, application_name="store-under-test")
    try:
        run_id = await store.submit(NEW)
        assert await asyncio.to_thread(terminate, database_url, "store-under-test") >= 1
        with pytest.raises(BackendUnavailable):
            await store.get(run_id)
        row = await store.get(run_id)
        assert row is not None and row.id == run_id
    finally:
        await store.close()


async def test_store_connect_errors_are_translated(pg_server: TestPostgres) -> None:
    with pytest.raises(BackendUnavailable):
        await PostgresStore.connect("postgresql://127.0.0.1:1/nothing", connect_timeout=2)
    with pytest.raises(BackendError, match="migrate"):
        await PostgresStore.connect(pg_server.empty_database())


async def test_query_errors_are_backend_errors(database_url: str) -> None:
    store = await PostgresStore.connect(database_url)
    try:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("alter table training_runs rename column results to results_gone")
        with pytest.raises(BackendError) as raised:
            await store.list_runs()
        assert not isinstance(raised.value, BackendUnavailable)
    finally:
        await store.close()
