"""RunAdmin contract: what the web app and the CLI do to `training_runs`."""

from __future__ import annotations

import re

from agent.domain.run import Canceled, NewRun
from agent.domain.status import RunStatus
from tests.contract.conftest import Harness, utc


async def test_submit_inserts_a_queued_run_that_get_returns(backend: Harness) -> None:
    run_id = await backend.store.submit(
        NewRun("/data/a.yaml", "YOLOv8s", {"epochs": 5, "augmentation": {"fliplr": 0.5}})
    )
    row = await backend.store.get(run_id)
    assert row is not None
    assert row.id == run_id
    assert row.status is RunStatus.QUEUED
    assert (row.data_yaml, row.base_model) == ("/data/a.yaml", "YOLOv8s")
    assert row.configuration == {"epochs": 5, "augmentation": {"fliplr": 0.5}}
    assert row.cancel_requested is False
    assert (row.worker_id, row.started_at, row.heartbeat_at, row.completed_at) == (None, None, None, None)
    assert row.attempt == 0
    assert row.created_at is not None
    assert run_id in (await backend.store.poll(10)).claimable


async def test_get_of_a_missing_or_malformed_id_is_none(backend: Harness) -> None:
    assert await backend.store.get("00000000-0000-0000-0000-000000000000") is None
    assert await backend.store.get("not-a-uuid") is None


async def test_list_runs_is_newest_first_and_limited(backend: Harness) -> None:
    old = await backend.insert_row(status="completed", data_yaml="/old.yaml", created_at=utc(60))
    mid = await backend.insert_row(status="queued", data_yaml="/mid.yaml", created_at=utc(30))
    new = await backend.store.submit(NewRun("/new.yaml"))
    assert [r.id for r in await backend.store.list_runs()] == [new, mid, old]
    assert [r.id for r in await backend.store.list_runs(limit=2)] == [new, mid]


async def test_configuration_stored_as_a_json_string_is_passed_through_raw(backend: Harness) -> None:
    run_id = await backend.insert_row(status="queued", configuration='{"epochs": 3}')
    row = await backend.store.get(run_id)
    assert row is not None and row.configuration == '{"epochs": 3}'
    bad = await backend.insert_row(status="queued", configuration="not json at all")
    row = await backend.store.get(bad)
    assert row is not None and row.configuration == "not json at all"


async def test_a_row_with_an_unknown_status_is_skipped_not_fatal(backend: Harness) -> None:
    odd = await backend.insert_row(status="paused-by-admin", data_yaml="/x.yaml")
    fine = await backend.store.submit(NewRun("/y.yaml"))
    assert await backend.store.get(odd) is None
    assert [r.id for r in await backend.store.list_runs()] == [fine]
    poll = await backend.store.poll(10)
    assert odd not in poll.claimable and odd not in poll.cancel_unclaimed
    assert await backend.store.claim(odd, "w1") is None


async def test_request_cancel_flags_live_runs_only(backend: Harness) -> None:
    queued = await backend.store.submit(NewRun("/a.yaml"))
    assert await backend.store.request_cancel(queued)
    assert await backend.store.request_cancel(queued)  # pressing twice is harmless
    row = await backend.store.get(queued)
    assert row is not None and row.cancel_requested and row.status is RunStatus.QUEUED

    running = await backend.store.submit(NewRun("/b.yaml"))
    claim = await backend.store.claim(running, "w1")
    assert claim is not None
    assert await backend.store.request_cancel(running)
    assert await backend.store.finish(claim.lease, Canceled())

    assert await backend.store.request_cancel(running) is False  # terminal now
    assert await backend.store.request_cancel("00000000-0000-0000-0000-000000000000") is False
    assert await backend.store.request_cancel("not-a-uuid") is False


async def test_submit_writes_the_name_project_and_step_the_app_shows(backend: Harness) -> None:
    named = await backend.store.submit(NewRun("/data/bolts/data.yaml", run_name="Inspect_bolt_v2"))
    unnamed = await backend.store.submit(NewRun("storage:datasets/p1/s1/bolts.yaml"))
    row = await backend.run_columns(named, "run_name", "project_id", "step_id")
    assert row == {"run_name": "Inspect_bolt_v2", "project_id": None, "step_id": None}
    name = (await backend.run_columns(unnamed, "run_name"))["run_name"]
    assert re.fullmatch(r"bolts_\d{8}-\d{6}", name), name
