"""A run in flight taken away by anyone else stops on the event, with no write after it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from agent.domain.run import Hint
from tests.unit.test_core import Harness, harness, run_config
from tests.util import wait_for


def quiet(tmp_path: Path) -> Harness:
    # Writes slower than the test: only the event can stop the run in time.
    h = harness(tmp_path, epoch_seconds=20.0, shutdown_mode="release")
    settings = dataclasses.replace(h.agent.deps.settings, heartbeat_interval=60.0, progress_interval=60.0)
    h.agent.deps = dataclasses.replace(h.agent.deps, settings=settings)
    return h


@pytest.mark.parametrize(
    "change",
    [
        {"worker_id": "old-script"},
        {"status": "stopped"},
        {"status": "canceled", "cancel_requested": True, "error_message": "Project deleted."},
        "delete",
    ],
)
async def test_a_run_taken_away_stops_on_the_event_and_is_left_alone(
    tmp_path: Path, change: dict[str, object] | str
) -> None:
    async with quiet(tmp_path) as h:
        run_id = h.store.insert_row(data_yaml="d.yaml", configuration=run_config(epochs=50))
        await wait_for(lambda: h.trainer.started, what="trainer started")
        if change == "delete":
            h.store.delete_row(run_id)
        else:
            assert isinstance(change, dict)
            h.store.set_fields(run_id, **change)
        before = None if change == "delete" else dataclasses.replace(h.store.runs[run_id])
        proc = h.trainer.started[0]
        await wait_for(lambda: proc.stop_reasons, timeout=3, what="trainer stopped")
        await wait_for(lambda: not h.agent.runs, timeout=3, what="run dropped")
        assert proc.stop_reasons == ["lost"]
        if before is not None:
            assert h.store.runs[run_id] == before


async def test_a_run_put_back_in_the_queue_is_stopped_and_claimed_afresh(tmp_path: Path) -> None:
    async with quiet(tmp_path) as h:
        run_id = h.store.insert_row(data_yaml="d.yaml", configuration=run_config(epochs=50))
        await wait_for(lambda: h.trainer.started, what="trainer started")
        # Another agent's rescue, while this one looked dead.
        h.store.set_fields(run_id, status="queued", worker_id=None, started_at=None)
        await wait_for(lambda: len(h.trainer.started) == 2, timeout=3, what="claimed again")
        assert h.trainer.started[0].stop_reasons == ["lost"]
        assert h.store.runs[run_id].attempt == 2


async def test_an_event_from_before_the_claim_does_not_stop_the_run(tmp_path: Path) -> None:
    async with quiet(tmp_path) as h:
        run_id = h.store.insert_row(data_yaml="d.yaml", configuration=run_config(epochs=50))
        await wait_for(lambda: h.trainer.started, what="trainer started")
        # The insert's hint once more, as a late or repeated event would bring it.
        rec = h.store.runs[run_id]
        await h.agent._handle(Hint(run_id, "INSERT", claimable=True, raw_status="queued", attempt=0))
        assert h.trainer.started[0].stop_reasons == [] and rec.status == "running"
