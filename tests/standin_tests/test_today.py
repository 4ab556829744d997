"""The stand-in as today's Supabase: no default grants, RLS on changes, the event quota, silent gaps."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from postgrest import APIError
from supabase import AsyncClient
from websockets.asyncio.client import ClientConnection, connect

from tests.standin.fixtures import running_project
from tests.standin.realtime import PRIVATE_ONLY
from tests.standin.realtime_params import binding_id
from tests.standin.server import StandIn
from tests.util import wait_for

Conn = psycopg.AsyncConnection[tuple[Any, ...]]


def ws_url(standin: StandIn, apikey: str, vsn: str = "1.0.0") -> str:
    return f"ws://127.0.0.1:{standin.port}/realtime/v1/websocket?apikey={apikey}&vsn={vsn}"


class Socket:
    """A raw websocket that collects every frame, V1 or V2, as (join_ref, ref, topic, event, payload)."""

    def __init__(self, conn: ClientConnection, v2: bool) -> None:
        self.conn = conn
        self.v2 = v2
        self.frames: list[tuple[Any, Any, str, str, Any]] = []
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for text in self.conn:
            msg = json.loads(text)
            if self.v2:
                self.frames.append(tuple(msg))  # type: ignore[arg-type]
            else:
                self.frames.append(
                    (msg.get("join_ref"), msg["ref"], msg["topic"], msg["event"], msg["payload"])
                )

    async def join(self, topic: str, bindings: list[dict[str, Any]], **config: Any) -> dict[str, Any]:
        payload = {"config": {"postgres_changes": bindings, **config}}
        ref = str(len(self.frames) + 100)
        if self.v2:
            await self.conn.send(json.dumps([ref, ref, f"realtime:{topic}", "phx_join", payload]))
        else:
            await self.conn.send(
                json.dumps(
                    {"topic": f"realtime:{topic}", "event": "phx_join", "payload": payload, "ref": ref}
                )
            )
        reply = await wait_for(lambda: self._reply(ref), timeout=5, what="join reply")
        return reply

    def _reply(self, ref: str) -> dict[str, Any] | None:
        for _, r, _, event, payload in self.frames:
            if r == ref and event == "phx_reply":
                return payload  # type: ignore[no-any-return]
        return None

    async def subscribed(self, topic: str) -> None:
        await wait_for(
            lambda: any(
                e == "system" and t == f"realtime:{topic}" and p.get("message") == "Subscribed to PostgreSQL"
                for _, _, t, e, p in self.frames
            ),
            timeout=5,
            what="Subscribed to PostgreSQL",
        )

    def changes(self, topic: str | None = None) -> list[tuple[Any, Any, str, str, Any]]:
        return [
            f
            for f in self.frames
            if f[3] == "postgres_changes" and (topic is None or f[2] == f"realtime:{topic}")
        ]

    async def close(self) -> None:
        self._task.cancel()
        await self.conn.close()


@pytest.fixture
async def sockets(standin: StandIn) -> AsyncIterator[list[Socket]]:
    opened: list[Socket] = []
    yield opened
    for sock in opened:
        await sock.close()


async def open_socket(standin: StandIn, opened: list[Socket], key: str, *, v2: bool = False) -> Socket:
    conn = await connect(ws_url(standin, key, "2.0.0" if v2 else "1.0.0"))
    sock = Socket(conn, v2)
    opened.append(sock)
    return sock


async def insert_run(db: Conn, **fields: Any) -> str:
    fields = {"status": "queued", **fields}
    cols = ", ".join(fields)
    marks = ", ".join(["%s"] * len(fields))
    cur = await db.execute(
        f"insert into training_runs ({cols}) values ({marks}) returning id", list(fields.values())
    )
    row = await cur.fetchone()
    assert row is not None
    return str(row[0])


async def test_a_new_table_is_granted_to_nobody(standin: StandIn, supabase: AsyncClient, db: Conn) -> None:
    await db.execute("create table public.fresh (id int primary key, note text)")
    with pytest.raises(APIError) as denied:
        await supabase.table("fresh").select("id").execute()
    assert denied.value.code == "42501"
    # The agent's tables were granted by its migration.
    assert (await supabase.table("training_runs").select("id").execute()).data == []


async def test_error_401_for_a_subscriber_without_select(
    standin: StandIn, sockets: list[Socket], db: Conn
) -> None:
    await db.execute("create table public.fresh (id int primary key, note text)")
    await standin.publish("public.fresh")
    sock = await open_socket(standin, sockets, standin.service_role_key)
    binding = {"event": "*", "schema": "public", "table": "fresh"}
    await sock.join("fresh", [binding])
    await sock.subscribed("fresh")
    await db.execute("insert into fresh values (1, 'a')")
    await wait_for(lambda: sock.changes("fresh"), timeout=5, what="a change")
    _, _, _, _, payload = sock.changes("fresh")[0]
    assert payload["ids"] == [binding_id(binding)]
    data = payload["data"]
    assert data["errors"] == ["Error 401: Unauthorized"]
    assert data["record"] == {} and data["commit_timestamp"] is None  # realtime-py cannot parse it
    await db.execute("grant select on public.fresh to service_role")
    await db.execute("insert into fresh values (2, 'b')")
    await wait_for(lambda: len(sock.changes("fresh")) == 2, timeout=5, what="a second change")
    assert sock.changes("fresh")[1][4]["data"]["record"] == {"id": 2, "note": "b"}


async def test_rls_decides_which_changes_anon_receives(
    standin: StandIn, sockets: list[Socket], db: Conn
) -> None:
    # The app's policy lets anon see every run; a narrower one shows only completed runs.
    await db.execute('drop policy "training_runs anon all" on training_runs')
    await db.execute("create policy done on training_runs for select to anon using (status = 'completed')")
    anon = await open_socket(standin, sockets, standin.anon_key)
    service = await open_socket(standin, sockets, standin.service_role_key)
    binding = {"event": "*", "schema": "public", "table": "training_runs"}
    for sock in (anon, service):
        await sock.join("runs", [binding])
        await sock.subscribed("runs")
    hidden = await insert_run(db)
    shown = await insert_run(db, status="completed")
    await db.execute("delete from training_runs where id = %s", [hidden])
    await wait_for(
        lambda: len(service.changes()) == 3, timeout=5, what="all three changes to the service role"
    )
    await wait_for(lambda: len(anon.changes()) == 2, timeout=5, what="anon's changes")
    inserted, deleted = (f[4]["data"] for f in anon.changes())
    assert (inserted["type"], inserted["record"]["id"]) == ("INSERT", shown)
    # A delete cannot be checked against policies: it goes out, with the key only.
    assert (deleted["type"], deleted["old_record"]) == ("DELETE", {"id": hidden})


async def test_the_event_quota_skips_every_change_while_over(database_url: str, tmp_path: Path) -> None:
    async with (
        running_project(
            database_url, tmp_path / "storage", max_events_per_second=20, quota_tick=0.2, quota_window=5
        ) as standin,
        await connect(ws_url(standin, standin.service_role_key)) as conn,
    ):
        sock = Socket(conn, v2=False)
        binding = {"event": "*", "schema": "public", "table": "training_runs"}
        # Three subscriptions on one channel: each change counts three events.
        await sock.join("a", [binding, {**binding, "event": "INSERT"}, {**binding, "event": "UPDATE"}])
        await sock.subscribed("a")
        quota = standin.realtime.quota
        quota.reset()
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as db:
            await insert_run(db)
            await wait_for(lambda: sock.changes(), timeout=5, what="the first change")
            assert quota.counted == 2  # the `*` and the INSERT binding
            # A burst well over 20 events/s averaged over one second.
            for _ in range(20):
                await insert_run(db)
            await wait_for(lambda: quota.triggered, timeout=5, what="the quota crossed")
            before = len(sock.changes())
            marker = await insert_run(db, data_yaml="while over")
            await wait_for(lambda: quota.skipped_changes >= 1, timeout=5, what="a skipped change")
            assert all(f[4]["data"]["record"].get("id") != marker for f in sock.changes()[before:])
            # Once the window slides past the burst, changes flow again, without a word to anyone.
            await wait_for(lambda: not quota.triggered, timeout=5, what="back under the quota")
            after = await insert_run(db, data_yaml="after")
            await wait_for(
                lambda: any(f[4]["data"]["record"].get("id") == after for f in sock.changes()),
                timeout=5,
                what="a change after the window slid",
            )
        sock._task.cancel()
    assert not any(f[3] == "system" and f[4].get("status") == "error" for f in sock.frames)


async def test_dropped_subscriptions_go_silent_until_the_channel_joins_again(
    standin: StandIn, sockets: list[Socket], db: Conn
) -> None:
    sock = await open_socket(standin, sockets, standin.service_role_key)
    binding = {"event": "INSERT", "schema": "public", "table": "training_runs"}
    await sock.join("runs", [binding])
    await sock.subscribed("runs")
    assert standin.faults.drop_subscriptions() == 1
    witness = await open_socket(standin, sockets, standin.service_role_key)
    await witness.join("runs", [binding])
    await witness.subscribed("runs")
    await insert_run(db)
    await wait_for(lambda: witness.changes(), timeout=5, what="the change on a channel joined since")
    # The change was handed to every connection before this heartbeat's reply: the dropped channel
    # got nothing, while its socket still answers.
    await sock.conn.send(json.dumps({"topic": "phoenix", "event": "heartbeat", "payload": {}, "ref": "hb"}))
    await wait_for(lambda: sock._reply("hb") is not None, timeout=5, what="heartbeat reply")
    assert sock.changes() == []
    await sock.join("runs", [binding])
    await wait_for(
        lambda: sum(1 for f in sock.frames if f[3] == "system") >= 2, timeout=5, what="subscribed again"
    )
    run_id = await insert_run(db)
    await wait_for(lambda: sock.changes(), timeout=5, what="a change after the rejoin")
    assert sock.changes()[0][4]["data"]["record"]["id"] == run_id


async def test_private_only_refuses_public_joins(standin: StandIn, sockets: list[Socket]) -> None:
    standin.realtime.private_only = True
    sock = await open_socket(standin, sockets, standin.service_role_key)
    binding = {"event": "INSERT", "schema": "public", "table": "training_runs"}
    refused = await sock.join("runs", [binding])
    assert refused == {"status": "error", "response": {"reason": PRIVATE_ONLY}}
    accepted = await sock.join("runs", [binding], private=True)
    assert accepted["status"] == "ok"
    anon = await open_socket(standin, sockets, standin.anon_key)
    assert (await anon.join("runs", [binding], private=True))["status"] == "error"


async def test_v2_change_frames_carry_no_join_ref(standin: StandIn, sockets: list[Socket], db: Conn) -> None:
    sock = await open_socket(standin, sockets, standin.service_role_key, v2=True)
    await sock.join("runs", [{"event": "INSERT", "schema": "public", "table": "training_runs"}])
    await sock.subscribed("runs")
    system = next(f for f in sock.frames if f[3] == "system")
    assert system[0] is not None  # pushed by the channel: its join ref
    await insert_run(db)
    await wait_for(lambda: sock.changes(), timeout=5, what="a change")
    join_ref, ref, topic, event, _ = sock.changes()[0]
    assert (join_ref, ref, topic, event) == (None, None, "realtime:runs", "postgres_changes")
