"""The official `supabase` async client's PostgREST calls against the stand-in."""

from __future__ import annotations

from typing import Any

import httpx
import psycopg
import pytest
from postgrest import APIError
from postgrest.types import CountMethod
from supabase import AsyncClient, acreate_client

from tests.standin.server import StandIn

Conn = psycopg.AsyncConnection[tuple[Any, ...]]


async def add_runs(supabase: AsyncClient, *statuses: str) -> list[dict[str, Any]]:
    rows = [
        {"status": s, "data_yaml": f"{i}.yaml", "configuration": {"epochs": i}}
        for i, s in enumerate(statuses)
    ]
    result = await supabase.table("training_runs").insert(rows).execute()
    return result.data


async def test_insert_returns_rows_as_postgrest_serializes_them(supabase: AsyncClient) -> None:
    result = (
        await supabase.table("training_runs")
        .insert({"status": "queued", "configuration": {"a": [1]}})
        .execute()
    )
    (row,) = result.data
    assert row["status"] == "queued" and row["configuration"] == {"a": [1]}
    assert row["attempt"] == 0 and row["worker_id"] is None and row["cancel_requested"] is False
    assert row["created_at"].endswith("+00:00") and "T" in row["created_at"]
    minimal = (
        await supabase.table("training_runs").insert({"status": "queued"}, returning="minimal").execute()
    )
    assert minimal.data == []


async def test_select_filters_order_limit(supabase: AsyncClient) -> None:
    await add_runs(supabase, "queued", "running", "queued", "completed")
    table = supabase.table("training_runs")
    queued = await table.select("data_yaml,status").eq("status", "queued").order("data_yaml").execute()
    assert queued.data == [
        {"data_yaml": "0.yaml", "status": "queued"},
        {"data_yaml": "2.yaml", "status": "queued"},
    ]
    desc = await table.select("data_yaml").order("data_yaml", desc=True).limit(2).execute()
    assert [r["data_yaml"] for r in desc.data] == ["3.yaml", "2.yaml"]
    page = await table.select("data_yaml").order("data_yaml").range(1, 2).execute()
    assert [r["data_yaml"] for r in page.data] == ["1.yaml", "2.yaml"]
    checks = {
        "neq": (await table.select("id").neq("status", "queued").execute()).data,
        "in": (await table.select("id").in_("status", ["running", "completed"]).execute()).data,
        "is": (await table.select("id").is_("worker_id", None).execute()).data,
        "not_is": (await table.select("id").not_.is_("worker_id", None).execute()).data,
        "gte": (await table.select("id").gte("data_yaml", "2.yaml").execute()).data,
        "lt": (await table.select("id").lt("data_yaml", "1.yaml").execute()).data,
        "like": (await table.select("id").like("data_yaml", "3*").execute()).data,
        "or": (await table.select("id").or_("status.eq.running,status.eq.completed").execute()).data,
        "json": (await table.select("id").eq("configuration->>epochs", "1").execute()).data,
    }
    assert {k: len(v) for k, v in checks.items()} == {
        "neq": 2, "in": 2, "is": 4, "not_is": 0, "gte": 2, "lt": 1, "like": 1, "or": 2, "json": 1,
    }  # fmt: skip


async def test_count_exact_and_content_range(supabase: AsyncClient, standin: StandIn) -> None:
    await add_runs(supabase, "queued", "queued", "queued")
    result = await supabase.table("training_runs").select("id", count=CountMethod.exact).limit(2).execute()
    assert result.count == 3 and len(result.data) == 2
    async with httpx.AsyncClient(base_url=f"{standin.url}/rest/v1", headers=_auth(standin)) as http:
        response = await http.get(
            "/training_runs", params={"select": "id"}, headers={"Prefer": "count=exact"}
        )
        assert response.status_code == 200 and response.headers["content-range"] == "0-2/3"
        response = await http.get("/training_runs", params={"limit": "1"}, headers={"Prefer": "count=exact"})
        assert response.status_code == 206 and response.headers["content-range"] == "0-0/3"
        response = await http.get("/training_runs", headers={"Range": "1-5"})
        assert response.headers["content-range"] == "1-2/*" and len(response.json()) == 2


async def test_update_with_filters_returns_rows_or_none(supabase: AsyncClient) -> None:
    (run,) = await add_runs(supabase, "queued")
    claim = (
        supabase.table("training_runs")
        .update({"status": "running", "worker_id": "w1"})
        .eq("id", run["id"])
        .in_("status", ["queued", "running"])
        .is_("worker_id", None)
    )
    won = await claim.execute()
    assert len(won.data) == 1 and won.data[0]["worker_id"] == "w1"
    assert won.data[0]["attempt"] == 1  # the migration's trigger ran
    lost = await claim.execute()
    assert lost.data == []


async def test_upsert_and_delete(supabase: AsyncClient, db: Conn) -> None:
    # The migration grants the agent's role no DELETE: this test grants it to exercise DELETE.
    await db.execute("grant delete on trainer_workers to service_role")
    workers = supabase.table("trainer_workers")
    await workers.upsert({"worker_id": "w1", "status": "online", "host": "a"}).execute()
    second = await workers.upsert({"worker_id": "w1", "status": "busy", "host": "b"}).execute()
    assert [(r["status"], r["host"]) for r in second.data] == [("busy", "b")]
    ignored = await workers.upsert({"worker_id": "w1", "status": "x"}, ignore_duplicates=True).execute()
    assert ignored.data == []
    assert len((await workers.select("*").execute()).data) == 1
    deleted = await workers.delete().eq("worker_id", "w1").execute()
    assert [r["worker_id"] for r in deleted.data] == ["w1"]
    assert (await workers.select("*").execute()).data == []


async def test_single_and_maybe_single(supabase: AsyncClient) -> None:
    (run,) = await add_runs(supabase, "queued")
    one = await supabase.table("training_runs").select("id").eq("id", run["id"]).single().execute()
    assert one.data == {"id": run["id"]}
    with pytest.raises(APIError) as none:
        await supabase.table("training_runs").select("id").eq("status", "nope").single().execute()
    assert none.value.code == "PGRST116"
    maybe = await supabase.table("training_runs").select("id").eq("status", "nope").maybe_single().execute()
    assert maybe is None


async def test_rpc(supabase: AsyncClient, db: Conn) -> None:
    await db.execute(
        "create function public.add(a int, b int default 1) returns int language sql as 'select a + b'"
    )
    await db.execute(
        "create function public.runs_with(s text) returns setof public.training_runs language sql stable"
        " as 'select * from public.training_runs where status = s'"
    )
    await db.execute("create function public.touch() returns void language sql as 'select'")
    await add_runs(supabase, "queued", "running")
    assert (await supabase.rpc("add", {"a": 2, "b": 3}).execute()).data == 5
    assert (await supabase.rpc("add", {"a": 2}).execute()).data == 3
    rows = (await supabase.rpc("runs_with", {"s": "running"}).select("status").execute()).data
    assert rows == [{"status": "running"}]
    assert (await supabase.rpc("touch").execute()).data == []
    with pytest.raises(APIError) as missing:
        await supabase.rpc("nope", {"x": 1}).execute()
    assert missing.value.code == "PGRST202"


async def test_errors_are_shaped_like_postgrest(supabase: AsyncClient, standin: StandIn) -> None:
    with pytest.raises(APIError) as column:
        await supabase.table("training_runs").select("nope").execute()
    assert column.value.code == "42703" and column.value.message == "column training_runs.nope does not exist"
    with pytest.raises(APIError) as body_column:
        await supabase.table("training_runs").insert({"nope": 1}).execute()
    assert body_column.value.code == "PGRST204"
    with pytest.raises(APIError) as duplicate:
        await supabase.table("trainer_workers").insert([{"worker_id": "w"}, {"worker_id": "w"}]).execute()
    assert duplicate.value.code == "23505"
    async with httpx.AsyncClient(base_url=f"{standin.url}/rest/v1", headers=_auth(standin)) as http:
        missing = await http.get("/nope")
        assert missing.status_code == 404 and missing.json()["code"] == "PGRST205"
        conflict = await http.post("/trainer_workers", json=[{"worker_id": "x"}, {"worker_id": "x"}])
        assert conflict.status_code == 409
        assert set(conflict.json()) == {"code", "details", "hint", "message"}
        bad_filter = await http.get("/training_runs", params={"status": "bogus.1"})
        assert bad_filter.status_code == 400 and bad_filter.json()["code"] == "PGRST100"
        bad_value = await http.get("/training_runs", params={"id": "eq.not-a-uuid"})
        assert bad_value.status_code == 400 and bad_value.json()["code"] == "22P02"
        unfiltered = await http.delete("/training_runs")
        assert (
            unfiltered.status_code == 400 and unfiltered.json()["message"] == "DELETE requires a WHERE clause"
        )


async def test_keys_and_roles(standin: StandIn, supabase: AsyncClient, db: Conn) -> None:
    await add_runs(supabase, "queued")
    async with httpx.AsyncClient(base_url=f"{standin.url}/rest/v1") as http:
        assert (await http.get("/training_runs")).status_code == 401
        assert (await http.get("/training_runs", headers={"apikey": "nope"})).status_code == 401
        bad_bearer = {"apikey": standin.anon_key, "Authorization": "Bearer nope"}
        response = await http.get("/training_runs", headers=bad_bearer)
        assert response.status_code == 401 and response.json()["code"] == "PGRST301"
    # Requests run as the key's role: row-level security without policies hides every row from anon.
    await db.execute('drop policy "training_runs anon all" on training_runs')
    anon = await acreate_client(standin.url, standin.anon_key)
    try:
        assert (await anon.table("training_runs").select("id").execute()).data == []
        with pytest.raises(APIError) as denied:
            await anon.table("training_runs").insert({"status": "queued"}).execute()
        assert denied.value.code == "42501"
    finally:
        await anon.postgrest.aclose()
    assert len((await supabase.table("training_runs").select("id").execute()).data) == 1


async def test_injected_failures(supabase: AsyncClient, standin: StandIn) -> None:
    standin.faults.fail_next("rest", 1, status=500)
    with pytest.raises(APIError) as failed:
        await supabase.table("training_runs").insert({"status": "queued"}).execute()
    assert failed.value.code == "PGRST000"
    await supabase.table("training_runs").insert({"status": "queued"}).execute()
    await standin.faults.refuse_connections()
    async with httpx.AsyncClient() as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(f"{standin.url}/rest/v1/training_runs", headers=_auth(standin))
    await standin.faults.accept_connections()
    assert len((await supabase.table("training_runs").select("id").execute()).data) == 1


def _auth(standin: StandIn) -> dict[str, str]:
    return {"apikey": standin.service_role_key, "Authorization": f"Bearer {standin.service_role_key}"}
