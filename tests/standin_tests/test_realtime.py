"""The official `realtime` client against the stand-in: bindings, payloads, filters, faults."""

from __future__ import annotations

import re
import time
from typing import Any

import psycopg
import pytest
from realtime import AsyncRealtimeClient, RealtimeSubscribeStates

from tests.standin.server import StandIn
from tests.standin_tests.conftest import subscribe
from tests.util import wait_for

Conn = psycopg.AsyncConnection[tuple[Any, ...]]
COMMIT_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
RUNS = {"event": "*", "schema": "public", "table": "training_runs"}


async def insert_run(db: Conn, status: str = "queued") -> str:
    cur = await db.execute(
        "insert into training_runs (status, data_yaml) values (%s, 'd.yaml') returning id", [status]
    )
    row = await cur.fetchone()
    assert row is not None
    return str(row[0])


async def test_insert_update_delete_arrive_with_realtime_payloads(
    realtime_client: AsyncRealtimeClient, db: Conn
) -> None:
    channel, rec = await subscribe(realtime_client, [RUNS])
    assert rec.states == [RealtimeSubscribeStates.SUBSCRIBED]
    assert rec.system[0].channel == "test" and rec.system[0].extension == "postgres_changes"
    binding_id = channel.postgres_changes_callbacks[0].id
    assert isinstance(binding_id, int) and binding_id > 0

    run_id = await insert_run(db)
    await db.execute("update training_runs set status = 'running' where id = %s", [run_id])
    await db.execute("delete from training_runs where id = %s", [run_id])
    await wait_for(lambda: len(rec.changes) == 3, timeout=5, what="three changes")

    insert, update, delete = (c["data"] for c in rec.changes)
    assert all(c["ids"] == [binding_id] for c in rec.changes)
    assert set(insert) == {"schema", "table", "commit_timestamp", "type", "columns", "errors", "record"}
    assert set(update) == set(insert) | {"old_record"}
    assert set(delete) == {"schema", "table", "commit_timestamp", "type", "columns", "errors", "old_record"}
    assert [d["type"] for d in (insert, update, delete)] == ["INSERT", "UPDATE", "DELETE"]
    for data in (insert, update, delete):
        assert (data["schema"], data["table"], data["errors"]) == ("public", "training_runs", None)
        assert COMMIT_TIMESTAMP.match(data["commit_timestamp"])
        assert {"name": "id", "type": "uuid"} in data["columns"]
        assert {"name": "configuration", "type": "jsonb"} in data["columns"]
        assert {"name": "cancel_requested", "type": "bool"} in data["columns"]
    assert insert["record"]["id"] == run_id and insert["record"]["status"] == "queued"
    assert re.match(r"^\d{4}-\d\d-\d\dT[\d:.]+\+00:00$", insert["record"]["created_at"])
    assert update["record"]["status"] == "running"
    assert update["old_record"] == {"id": run_id}  # only the primary key without replica identity full
    assert delete["old_record"] == {"id": run_id}


async def test_two_quick_updates_give_two_events_with_their_own_rows(
    realtime_client: AsyncRealtimeClient, db: Conn
) -> None:
    _, rec = await subscribe(realtime_client, [{**RUNS, "event": "UPDATE"}])
    run_id = await insert_run(db)
    await db.execute("update training_runs set status = 'running' where id = %s", [run_id])
    await db.execute("update training_runs set cancel_requested = true where id = %s", [run_id])
    async with db.transaction():
        await db.execute("update training_runs set status = 'canceling' where id = %s", [run_id])
        await db.execute("update training_runs set status = 'canceled' where id = %s", [run_id])
    await wait_for(lambda: len(rec.changes) == 4, timeout=5, what="four updates")
    records = [c["data"]["record"] for c in rec.changes]
    assert [(r["status"], r["cancel_requested"]) for r in records] == [
        ("running", False),
        ("running", True),
        ("canceling", True),
        ("canceled", True),
    ]
    assert rec.of_type("INSERT") == []


async def test_replica_identity_full_sends_the_whole_old_row(
    realtime_client: AsyncRealtimeClient, db: Conn
) -> None:
    await db.execute("alter table training_runs replica identity full")
    _, rec = await subscribe(realtime_client, [{**RUNS, "event": "UPDATE"}])
    run_id = await insert_run(db)
    await db.execute("update training_runs set status = 'running' where id = %s", [run_id])
    await wait_for(lambda: rec.changes, timeout=5, what="update")
    old = rec.changes[0]["data"]["old_record"]
    assert old["id"] == run_id and old["status"] == "queued" and "created_at" in old


@pytest.fixture
async def items(standin: StandIn, db: Conn) -> None:
    await db.execute("create table public.items (id int primary key, n int, label text, data bytea)")
    # Today's Supabase grants a new table to nobody: Realtime's subscriber needs SELECT.
    await db.execute("grant select on public.items to service_role")
    await standin.publish("public.items")


@pytest.mark.usefixtures("items")
async def test_server_side_filters(realtime_client: AsyncRealtimeClient, db: Conn) -> None:
    filters = ["n=eq.2", "n=neq.2", "n=lt.2", "n=lte.2", "n=gt.2", "n=gte.2", "label=in.(a,c)", "id=eq.2"]
    bindings = [{"event": "*", "schema": "public", "table": "items", "filter": f} for f in filters]
    channel, rec = await subscribe(realtime_client, bindings)
    ids = {f: cb.id for f, cb in zip(filters, channel.postgres_changes_callbacks, strict=True)}
    for i, label in zip((1, 2, 3), ("a", "b", "c"), strict=True):
        await db.execute("insert into items (id, n, label) values (%s, %s, %s)", [i, i, label])
    # Each matching binding's callback sees the push, so the recorder holds one entry per binding.
    await wait_for(lambda: len(rec.changes) == 12, timeout=5, what="inserts, once per matching binding")
    matched = {c["data"]["record"]["id"]: set(c["ids"]) for c in rec.changes}
    expect = {
        1: {"n=neq.2", "n=lt.2", "n=lte.2", "label=in.(a,c)"},
        2: {"n=eq.2", "n=lte.2", "n=gte.2", "id=eq.2"},
        3: {"n=neq.2", "n=gt.2", "n=gte.2", "label=in.(a,c)"},
    }
    assert matched == {k: {ids[f] for f in v} for k, v in expect.items()}
    # A delete is matched against the old row's identity (the primary key): a filter on another
    # column fails closed, one on the key matches.
    await db.execute("delete from items where id = 2")
    await wait_for(lambda: rec.of_type("DELETE"), timeout=5, what="delete")
    assert [set(c["ids"]) for c in rec.of_type("DELETE")] == [{ids["id=eq.2"]}]


@pytest.mark.usefixtures("items")
async def test_event_kinds_and_bytea(realtime_client: AsyncRealtimeClient, db: Conn) -> None:
    _, rec = await subscribe(realtime_client, [{"event": "INSERT", "schema": "public", "table": "items"}])
    await db.execute("insert into items (id, n, data) values (1, 1, '\\x0102ff')")
    await db.execute("update items set n = 2 where id = 1")
    await db.execute("insert into items (id, n) values (2, 2)")
    await wait_for(lambda: len(rec.changes) == 2, timeout=5, what="two inserts")
    assert [c["data"]["type"] for c in rec.changes] == ["INSERT", "INSERT"]
    assert rec.changes[0]["data"]["record"]["data"] == "0102ff"  # wal2json's bare hex


async def test_table_outside_the_publication_is_refused(
    realtime_client: AsyncRealtimeClient, standin: StandIn, db: Conn
) -> None:
    await db.execute("create table public.unpublished (id int primary key)")
    _, rec = await subscribe(
        realtime_client, [{"event": "*", "schema": "public", "table": "unpublished"}], wait_system=False
    )
    await wait_for(
        lambda: RealtimeSubscribeStates.CHANNEL_ERROR in rec.states, timeout=5, what="channel error"
    )
    assert rec.states[0] == RealtimeSubscribeStates.SUBSCRIBED  # the join itself is accepted
    assert rec.system == []  # errors go to on_error, not to system callbacks


async def test_events_before_subscribed_to_postgresql_are_lost(
    realtime_client: AsyncRealtimeClient, standin: StandIn, db: Conn
) -> None:
    standin.faults.delay_subscribed(None)
    _, rec = await subscribe(realtime_client, [RUNS], wait_system=False)
    assert rec.states == [RealtimeSubscribeStates.SUBSCRIBED]
    early = await insert_run(db)
    standin.faults.release_subscribed()
    await wait_for(lambda: rec.subscribed_to_postgres() == 1, timeout=5, what="Subscribed to PostgreSQL")
    late = await insert_run(db)
    await wait_for(lambda: rec.changes, timeout=5, what="late insert")
    assert [c["data"]["record"]["id"] for c in rec.changes] == [late]
    assert early != late


async def test_delay_subscribed_by_seconds(realtime_client: AsyncRealtimeClient, standin: StandIn) -> None:
    standin.faults.delay_subscribed(0.3)
    started = time.monotonic()
    _, rec = await subscribe(realtime_client, [RUNS])
    assert time.monotonic() - started >= 0.3
    assert rec.subscribed_to_postgres() == 1


async def test_dropped_websocket_reconnects_and_resubscribes(
    realtime_client: AsyncRealtimeClient, standin: StandIn, db: Conn
) -> None:
    _, rec = await subscribe(realtime_client, [RUNS])
    assert standin.faults.drop_websockets() == 1
    await wait_for(
        lambda: RealtimeSubscribeStates.CHANNEL_ERROR in rec.states, timeout=5, what="client sees drop"
    )
    await wait_for(lambda: rec.subscribed_to_postgres() == 2, timeout=5, what="resubscribed")
    assert rec.states[-1] == RealtimeSubscribeStates.SUBSCRIBED
    run_id = await insert_run(db)
    await wait_for(lambda: rec.changes, timeout=5, what="insert after reconnect")
    assert rec.changes[0]["data"]["record"]["id"] == run_id


async def test_realtime_down_refuses_until_up(
    realtime_client: AsyncRealtimeClient, standin: StandIn, db: Conn
) -> None:
    _, rec = await subscribe(realtime_client, [RUNS])
    joins = standin.realtime.joins
    standin.faults.realtime_down()
    await wait_for(
        lambda: RealtimeSubscribeStates.CHANNEL_ERROR in rec.states, timeout=5, what="client sees drop"
    )
    assert standin.realtime.connections == 0
    await insert_run(db)  # missed while down: realtime has no replay
    standin.faults.realtime_up()
    await wait_for(lambda: rec.subscribed_to_postgres() == 2, timeout=10, what="back after realtime_up")
    assert standin.realtime.joins == joins + 1
    run_id = await insert_run(db)
    await wait_for(lambda: rec.changes, timeout=5, what="insert after up")
    assert [c["data"]["record"]["id"] for c in rec.changes] == [run_id]


async def test_stalled_frames_arrive_late_and_in_order(
    realtime_client: AsyncRealtimeClient, standin: StandIn, db: Conn
) -> None:
    _, rec = await subscribe(realtime_client, [{**RUNS, "event": "INSERT"}])
    standin.faults.stall_realtime(0.4)
    started = time.monotonic()
    first, second = await insert_run(db, "a"), await insert_run(db, "b")
    await wait_for(lambda: len(rec.changes) == 2, timeout=5, what="stalled inserts")
    assert time.monotonic() - started >= 0.35
    assert [c["data"]["record"]["id"] for c in rec.changes] == [first, second]


async def test_leave_closes_the_channel(realtime_client: AsyncRealtimeClient) -> None:
    channel, rec = await subscribe(realtime_client, [RUNS])
    await channel.unsubscribe()
    await wait_for(lambda: RealtimeSubscribeStates.CLOSED in rec.states, timeout=5, what="closed")


async def test_invalid_api_key_is_refused(standin: StandIn) -> None:
    client = AsyncRealtimeClient(f"{standin.url}/realtime/v1", "not-a-jwt", max_retries=1)
    with pytest.raises(Exception, match="401"):
        await client.connect()


async def test_server_closes_channels(realtime_client: AsyncRealtimeClient, standin: StandIn) -> None:
    channel, rec = await subscribe(realtime_client, [RUNS])
    assert standin.faults.close_channels() == 1
    await wait_for(
        lambda: RealtimeSubscribeStates.CLOSED in rec.states, timeout=5, what="closed by the server"
    )
    assert channel.is_closed and standin.realtime.connections == 1
