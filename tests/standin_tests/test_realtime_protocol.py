"""Realtime's wire protocol frame by frame (Phoenix V1 JSON), as realtime-py 2.34.1 sends and parses it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from tests.standin.realtime_params import binding_id
from tests.standin.server import StandIn


def ws_url(standin: StandIn, apikey: str, vsn: str = "1.0.0") -> str:
    return f"ws://127.0.0.1:{standin.port}/realtime/v1/websocket?apikey={apikey}&vsn={vsn}"


@pytest.fixture
async def ws(standin: StandIn) -> AsyncIterator[ClientConnection]:
    async with connect(ws_url(standin, standin.service_role_key)) as conn:
        yield conn


async def send(ws: ClientConnection, topic: str, event: str, payload: Any, ref: str | None) -> None:
    await ws.send(
        json.dumps({"topic": topic, "event": event, "payload": payload, "ref": ref, "join_ref": ref})
    )


async def receive(ws: ClientConnection) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout=5))  # type: ignore[no-any-return]


async def test_join_reply_system_message_and_change(standin: StandIn, ws: ClientConnection) -> None:
    binding = {"event": "INSERT", "schema": "public", "table": "training_runs"}
    await send(ws, "realtime:runs", "phx_join", {"config": {"postgres_changes": [binding]}}, "1")
    reply = await receive(ws)
    assert reply == {
        "topic": "realtime:runs",
        "event": "phx_reply",
        "payload": {
            "status": "ok",
            "response": {"postgres_changes": [{**binding, "id": binding_id(binding)}]},
        },
        "ref": "1",
    }
    system = await receive(ws)
    assert system == {
        "topic": "realtime:runs",
        "event": "system",
        "payload": {
            "channel": "runs",
            "extension": "postgres_changes",
            "status": "ok",
            "message": "Subscribed to PostgreSQL",
        },
        "ref": None,
    }
    await standin.sync_triggers()
    async with standin._pool.connection() as conn:
        await conn.execute("insert into training_runs (status) values ('queued')")
        await conn.commit()
    change = await receive(ws)
    assert set(change) == {"topic", "event", "payload", "ref"}
    assert (change["topic"], change["event"], change["ref"]) == ("realtime:runs", "postgres_changes", None)
    assert change["payload"]["ids"] == [binding_id(binding)]
    assert change["payload"]["data"]["type"] == "INSERT"


async def test_heartbeat_leave_and_unmatched_topic(ws: ClientConnection) -> None:
    await send(ws, "phoenix", "heartbeat", {}, None)
    assert await receive(ws) == {
        "topic": "phoenix",
        "event": "phx_reply",
        "payload": {"status": "ok", "response": {}},
        "ref": None,
    }
    await send(ws, "realtime:nope", "broadcast", {"type": "broadcast", "event": "x", "payload": {}}, "2")
    assert (await receive(ws))["payload"] == {"status": "error", "response": {"reason": "unmatched topic"}}
    await send(ws, "realtime:room", "phx_join", {"config": {}}, "3")
    assert (await receive(ws))["payload"] == {"status": "ok", "response": {"postgres_changes": []}}
    await send(ws, "realtime:room", "phx_leave", {}, "4")
    assert await receive(ws) == {
        "topic": "realtime:room",
        "event": "phx_reply",
        "payload": {"status": "ok", "response": {}},
        "ref": "4",
    }
    assert await receive(ws) == {"topic": "realtime:room", "event": "phx_close", "payload": {}, "ref": "3"}


async def test_broadcast_to_self_with_ack(ws: ClientConnection) -> None:
    config = {"broadcast": {"self": True, "ack": True}}
    await send(ws, "realtime:room", "phx_join", {"config": config}, "1")
    await receive(ws)
    message = {"type": "broadcast", "event": "hello", "payload": {"n": 1}}
    await send(ws, "realtime:room", "broadcast", message, "2")
    frames = [await receive(ws), await receive(ws)]
    assert {"topic": "realtime:room", "event": "broadcast", "payload": message, "ref": None} in frames
    assert any(f["event"] == "phx_reply" and f["ref"] == "2" for f in frames)


async def test_bad_filter_and_bad_token(standin: StandIn, ws: ClientConnection) -> None:
    bad = {"event": "*", "schema": "public", "table": "training_runs", "filter": "nope=eq.1"}
    await send(ws, "realtime:f", "phx_join", {"config": {"postgres_changes": [bad]}}, "1")
    assert (await receive(ws))["payload"]["status"] == "ok"
    system = (await receive(ws))["payload"]
    assert (system["extension"], system["status"]) == ("postgres_changes", "error")
    assert "invalid column for filter nope" in system["message"]
    await send(ws, "realtime:g", "phx_join", {"config": {}, "access_token": "garbage"}, "2")
    assert (await receive(ws))["payload"]["status"] == "error"
    await send(ws, "realtime:f", "access_token", {"access_token": "garbage"}, None)
    system = await receive(ws)
    assert (system["event"], system["payload"]["status"]) == ("system", "error")
    assert (await receive(ws))["event"] == "phx_close"


async def test_v2_array_frames(standin: StandIn) -> None:
    async with connect(ws_url(standin, standin.anon_key, vsn="2.0.0")) as conn:
        await conn.send(json.dumps(["1", "1", "realtime:room", "phx_join", {"config": {}}]))
        reply = json.loads(await asyncio.wait_for(conn.recv(), timeout=5))
        assert reply == [
            "1",
            "1",
            "realtime:room",
            "phx_reply",
            {"status": "ok", "response": {"postgres_changes": []}},
        ]


async def test_handshake_refusals(standin: StandIn) -> None:
    with pytest.raises(InvalidStatus) as bad_key:
        async with connect(ws_url(standin, "not-a-jwt")):
            pass
    assert bad_key.value.response.status_code == 401
    standin.faults.realtime_down()
    with pytest.raises(InvalidStatus) as down:
        async with connect(ws_url(standin, standin.anon_key)):
            pass
    assert down.value.response.status_code == 503
    standin.faults.realtime_up()
    standin.faults.fail_next("realtime", 1, status=502)
    with pytest.raises(InvalidStatus) as failed:
        async with connect(ws_url(standin, standin.anon_key)):
            pass
    assert failed.value.response.status_code == 502
    async with connect(ws_url(standin, standin.anon_key)):
        pass
