"""The whole agent on the supabase backend: pickup by Realtime, cancel from the same channel, artifacts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from agent.backends.supabase import SupabaseBackends, open_supabase
from agent.core.agent import Agent
from agent.domain.run import CANCELED_MESSAGE, NewRun
from agent.domain.status import RunStatus
from agent.wiring import build_agent
from tests.standin import StandIn
from tests.supabase.harness import FAST, settings_for
from tests.util import wait_for


@pytest.fixture
async def agent(standin: StandIn, tmp_path: Path) -> AsyncIterator[tuple[Agent, SupabaseBackends]]:
    """An agent running in this process, on the stand-in, with the fake trainer."""
    # A slow poll and slow heartbeats: pickups and cancels within the deadlines come from Realtime.
    settings = settings_for(
        standin,
        tmp_path / "agent",
        poll_interval=600.0,
        degraded_poll_interval=0.5,
        heartbeat_interval=5.0,
        progress_interval=5.0,
        stale_after=30.0,
        stop_grace=2.0,
        kill_grace=2.0,
        offline=True,
    )
    backends = await open_supabase(settings, tuning=FAST)
    agent = build_agent(settings, backends, offline=True)  # type: ignore[arg-type]
    task = asyncio.create_task(agent.run())
    try:
        await wait_for(lambda: agent.ready.is_set() or task.done(), what="agent subscribed")
        assert not task.done()
        yield agent, backends
    finally:
        agent.stop("test over")
        await asyncio.wait_for(task, timeout=30)
        await backends.close()


def fake_run(epochs: int, epoch_seconds: float) -> NewRun:
    return NewRun(
        "/unused.yaml", "YOLOv8n", {"trainer": "fake", "epochs": epochs, "fakeEpochSeconds": epoch_seconds}
    )


async def test_a_run_is_picked_up_trained_and_its_artifacts_download(
    agent: tuple[Agent, SupabaseBackends],
) -> None:
    _, backends = agent
    submitted = time.monotonic()
    run_id = await backends.admin.submit(fake_run(epochs=2, epoch_seconds=0.2))

    async def status_in(*wanted: RunStatus) -> bool:
        row = await backends.admin.get(run_id)
        return row is not None and row.status in wanted

    await wait_for(lambda: status_in(RunStatus.RUNNING, RunStatus.COMPLETED), timeout=5, what="claimed")
    picked_up = time.monotonic() - submitted
    assert picked_up < 1.0, f"picked up after {picked_up:.2f}s"
    await wait_for(lambda: status_in(RunStatus.COMPLETED), timeout=30, what="completed")
    row = await backends.admin.get(run_id)
    assert row is not None and row.results is not None and row.trained_model_url
    async with httpx.AsyncClient() as client:
        for artifact in row.results["artifacts"]:
            response = await client.get(artifact["url"])
            assert response.status_code == 200, artifact
    best = next(a for a in row.results["artifacts"] if a["name"] == "best.pt")
    assert best["url"] == row.trained_model_url
    assert best["path"] == f"training_runs/{run_id}/weights/best.pt"


async def test_the_cancel_button_stops_a_run_within_about_a_second(
    agent: tuple[Agent, SupabaseBackends],
) -> None:
    runner, backends = agent
    run_id = await backends.admin.submit(fake_run(epochs=100, epoch_seconds=1.0))
    await wait_for(lambda: run_id in runner.runs and runner.runs[run_id].pid is not None, timeout=10)

    async def progressed() -> bool:
        row = await backends.admin.get(run_id)
        return bool(row and row.results and row.results.get("progress"))

    await wait_for(progressed, timeout=10, what="progress written")
    pressed = time.monotonic()
    assert await backends.admin.request_cancel(run_id)

    async def canceled() -> bool:
        row = await backends.admin.get(run_id)
        return row is not None and row.status is RunStatus.CANCELED

    await wait_for(canceled, timeout=10, what="canceled")
    took = time.monotonic() - pressed
    row = await backends.admin.get(run_id)
    assert row is not None and row.error_message == CANCELED_MESSAGE and row.canceled_at is not None
    assert took < 2.0, f"canceled after {took:.2f}s"


async def test_runs_submitted_while_realtime_is_down_are_picked_up_by_the_poll(
    agent: tuple[Agent, SupabaseBackends], standin: StandIn
) -> None:
    runner, backends = agent
    standin.faults.realtime_down()
    await wait_for(lambda: not backends.events.healthy, what="stream down")
    run_ids = [await backends.admin.submit(fake_run(epochs=1, epoch_seconds=0.05)) for _ in range(3)]

    async def all_completed(ids: list[str]) -> bool:
        rows = [await backends.admin.get(i) for i in ids]
        return all(r is not None and r.status is RunStatus.COMPLETED for r in rows)

    await wait_for(lambda: all_completed(run_ids), timeout=30, what="completed by the degraded poll")
    standin.faults.realtime_up()
    await wait_for(lambda: backends.events.healthy, timeout=10, what="resubscribed")
    submitted = time.monotonic()
    fresh = await backends.admin.submit(fake_run(epochs=1, epoch_seconds=0.05))

    async def claimed() -> bool:
        row = await backends.admin.get(fresh)
        return row is not None and row.worker_id == runner.worker_id

    await wait_for(claimed, timeout=5, what="instant pickup again")
    assert time.monotonic() - submitted < 1.0
