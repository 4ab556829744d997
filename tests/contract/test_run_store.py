"""RunStore contract: claim, fencing, progress, final writes, poll, rescue, worker registry."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from agent.domain.run import (
    CANCELED_MESSAGE,
    Canceled,
    Claimed,
    Completed,
    Failed,
    Lease,
    NewRun,
    RescueReport,
    WorkerInfo,
    WorkerState,
)
from agent.domain.status import RunStatus, WorkerStatus
from tests.contract.conftest import Harness, utc

NEW = NewRun(data_yaml="/data/coco8.yaml", base_model="YOLOv8n", configuration={"epochs": 3})


async def submit(backend: Harness, run: NewRun = NEW) -> str:
    return await backend.store.submit(run)


async def claimed(backend: Harness, worker: str = "w1") -> Claimed:
    run_id = await submit(backend)
    claim = await backend.store.claim(run_id, worker)
    assert claim is not None
    return claim


async def test_claim_returns_the_lease_and_the_running_row(backend: Harness) -> None:
    run_id = await submit(backend)
    claim = await backend.store.claim(run_id, "w1")
    assert claim is not None
    assert claim.lease == Lease(run_id, "w1", 1)
    row = claim.row
    assert row.id == run_id
    assert row.status is RunStatus.RUNNING
    assert row.worker_id == "w1"
    assert row.attempt == 1
    assert row.started_at is not None and row.heartbeat_at is not None
    assert row.configuration == {"epochs": 3}
    assert await backend.store.get(run_id) == row


async def test_exactly_one_of_many_concurrent_claimers_wins(backend: Harness) -> None:
    run_id = await submit(backend)
    stores = [backend.store, *[await backend.another_store() for _ in range(3)]]
    results = await asyncio.gather(*(stores[i % len(stores)].claim(run_id, f"w{i}") for i in range(20)))
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    row = await backend.store.get(run_id)
    assert row is not None and row.worker_id == winners[0].lease.worker_id and row.attempt == 1


async def test_many_runs_and_claimers_each_run_claimed_once(backend: Harness) -> None:
    run_ids = [await submit(backend) for _ in range(10)]
    stores = [backend.store, await backend.another_store(), await backend.another_store()]

    async def agent(i: int) -> list[str]:
        won = []
        for run_id in run_ids:
            if await stores[i % len(stores)].claim(run_id, f"w{i}") is not None:
                won.append(run_id)
        return won

    won = [run_id for batch in await asyncio.gather(*(agent(i) for i in range(6))) for run_id in batch]
    assert sorted(won) == sorted(run_ids)


@pytest.mark.parametrize(
    "fields",
    [
        {"started_at": utc(60)},
        {"worker_id": "someone-else"},
        {"cancel_requested": True},
        {"status": "canceling"},
        {"status": "completed"},
        {"status": "failed"},
        {"status": "canceled"},
    ],
    ids=["started", "owned", "cancel-requested", "canceling", "completed", "failed", "canceled"],
)
async def test_a_run_that_is_not_claimable_is_not_claimed(backend: Harness, fields: dict[str, Any]) -> None:
    run_id = await submit(backend)
    await backend.set_fields(run_id, **fields)
    before = await backend.store.get(run_id)
    assert await backend.store.claim(run_id, "w1") is None
    assert await backend.store.get(run_id) == before


async def test_a_running_row_left_unclaimed_by_the_old_script_is_claimable(backend: Harness) -> None:
    run_id = await backend.insert_row(status="running", data_yaml="/d.yaml", cancel_requested=None)
    assert run_id in (await backend.store.poll(10)).claimable
    assert await backend.store.claim(run_id, "w1") is not None


async def test_claim_of_a_missing_or_malformed_id_is_none(backend: Harness) -> None:
    assert await backend.store.claim("00000000-0000-0000-0000-000000000000", "w1") is None
    assert await backend.store.claim("not-a-uuid", "w1") is None


async def test_release_makes_the_run_claimable_and_the_next_claim_has_a_new_attempt(backend: Harness) -> None:
    first = await claimed(backend)
    assert await backend.store.release(first.lease)
    row = await backend.store.get(first.lease.run_id)
    assert row is not None
    assert row.status is RunStatus.QUEUED
    assert (row.worker_id, row.started_at, row.heartbeat_at) == (None, None, None)
    assert row.attempt == 1
    second = await backend.store.claim(first.lease.run_id, "w2")
    assert second is not None and second.lease.attempt == 2
    assert await backend.store.touch(first.lease) is None
    assert await backend.store.release(first.lease) is False


@pytest.mark.parametrize("stale", ["attempt", "worker"])
async def test_writes_with_a_stale_lease_match_nothing(backend: Harness, stale: str) -> None:
    claim = await claimed(backend)
    lease = claim.lease
    bad = (
        Lease(lease.run_id, lease.worker_id, lease.attempt + 1)
        if stale == "attempt"
        else Lease(lease.run_id, "intruder", lease.attempt)
    )
    before = await backend.store.get(lease.run_id)
    assert await backend.store.touch(bad, {"progress": {"epoch": 9}}) is None
    assert await backend.store.mark_canceling(bad) is False
    assert await backend.store.finish(bad, Completed({"mAP": 1.0}, "http://x/best.pt")) is False
    assert await backend.store.finish(bad, Failed("nope")) is False
    assert await backend.store.finish(bad, Canceled()) is False
    assert await backend.store.release(bad) is False
    assert await backend.store.get(lease.run_id) == before


async def test_writes_for_a_missing_run_match_nothing(backend: Harness) -> None:
    for run_id in ("00000000-0000-0000-0000-000000000000", "not-a-uuid"):
        lease = Lease(run_id, "w1", 1)
        assert await backend.store.touch(lease) is None
        assert await backend.store.finish(lease, Canceled()) is False
        assert await backend.store.release(lease) is False
        assert await backend.store.mark_canceling(lease) is False


async def test_touch_bumps_the_heartbeat_merges_results_and_reports_cancel(backend: Harness) -> None:
    claim = await claimed(backend)
    lease = claim.lease
    await backend.make_stale(lease.run_id, 30)
    aged = await backend.store.get(lease.run_id)
    assert aged is not None and aged.heartbeat_at is not None

    pulse = await backend.store.touch(lease, {"progress": {"epoch": 1, "percent": 10.0}})
    assert pulse is not None and pulse.cancel_requested is False
    await backend.store.touch(lease, {"metrics": {"loss": 0.5}})
    await backend.store.touch(lease, {"progress": {"epoch": 2, "percent": 20.0}})
    assert await backend.store.touch(lease) is not None

    row = await backend.store.get(lease.run_id)
    assert row is not None
    assert row.results == {"progress": {"epoch": 2, "percent": 20.0}, "metrics": {"loss": 0.5}}
    assert row.heartbeat_at is not None and row.heartbeat_at > aged.heartbeat_at

    assert await backend.store.request_cancel(lease.run_id)
    pulse = await backend.store.touch(lease)
    assert pulse is not None and pulse.cancel_requested is True


async def test_touch_replaces_results_that_are_not_an_object(backend: Harness) -> None:
    claim = await claimed(backend)
    await backend.set_fields(claim.lease.run_id, results=["legacy"])
    assert await backend.store.touch(claim.lease, {"progress": {"epoch": 1}}) is not None
    row = await backend.store.get(claim.lease.run_id)
    assert row is not None and row.results == {"progress": {"epoch": 1}}


async def test_non_finite_metrics_are_stored_as_null(backend: Harness) -> None:
    claim = await claimed(backend)
    assert await backend.store.touch(claim.lease, {"metrics": {"loss": float("nan"), "map": float("inf")}})
    row = await backend.store.get(claim.lease.run_id)
    assert row is not None and row.results == {"metrics": {"loss": None, "map": None}}


async def test_finish_completed_writes_the_row_contract(backend: Harness) -> None:
    claim = await claimed(backend)
    lease = claim.lease
    await backend.store.touch(lease, {"progress": {"epoch": 3, "percent": 100.0}})
    results = {"mAP": 0.5, "precision": 0.6, "recall": 0.7, "artifacts": [{"name": "best.pt"}]}
    assert await backend.store.finish(lease, Completed(results, "http://blobs/best.pt"))
    row = await backend.store.get(lease.run_id)
    assert row is not None
    assert row.status is RunStatus.COMPLETED
    assert row.completed_at is not None and row.canceled_at is None
    assert row.trained_model_url == "http://blobs/best.pt"
    assert row.results == {"progress": {"epoch": 3, "percent": 100.0}, **results}
    assert row.worker_id == "w1" and row.attempt == 1
    # A retry after a lost response lands again; another outcome or any later write does not.
    assert await backend.store.finish(lease, Completed(results, "http://blobs/best.pt"))
    assert await backend.store.finish(lease, Failed("late")) is False
    assert await backend.store.touch(lease) is None
    assert await backend.store.mark_canceling(lease) is False
    assert await backend.store.release(lease) is False
    assert await backend.store.get(lease.run_id) == row


async def test_finish_failed_writes_the_row_contract(backend: Harness) -> None:
    claim = await claimed(backend)
    assert await backend.store.finish(claim.lease, Failed("epochs: must be >= 1", {"log": ["x"]}))
    row = await backend.store.get(claim.lease.run_id)
    assert row is not None
    assert row.status is RunStatus.FAILED
    assert row.error_message == "epochs: must be >= 1"
    assert row.completed_at is not None and row.canceled_at is None
    assert row.results == {"log": ["x"]}
    assert await backend.store.finish(claim.lease, Failed("epochs: must be >= 1"))


async def test_cancel_of_an_owned_run_goes_through_canceling_to_canceled(backend: Harness) -> None:
    claim = await claimed(backend)
    lease = claim.lease
    assert await backend.store.request_cancel(lease.run_id)
    assert await backend.store.mark_canceling(lease)
    row = await backend.store.get(lease.run_id)
    assert row is not None and row.status is RunStatus.CANCELING and row.cancel_requested
    pulse = await backend.store.touch(lease)
    assert pulse is not None and pulse.cancel_requested
    assert await backend.store.finish(lease, Canceled())
    row = await backend.store.get(lease.run_id)
    assert row is not None
    assert row.status is RunStatus.CANCELED
    assert row.error_message == CANCELED_MESSAGE == "Canceled by user."
    assert row.canceled_at is not None and row.completed_at is not None
    assert await backend.store.finish(lease, Canceled())


async def test_poll_lists_claimable_runs_oldest_first_and_unclaimed_cancels(backend: Harness) -> None:
    newest = await backend.insert_row(status="queued", data_yaml="/c.yaml", created_at=utc(10))
    oldest = await backend.insert_row(status="queued", data_yaml="/a.yaml", created_at=utc(30))
    middle = await backend.insert_row(status="queued", data_yaml="/b.yaml", created_at=utc(20))
    taken = await backend.insert_row(status="queued", data_yaml="/d.yaml", created_at=utc(40))
    done = await backend.insert_row(status="completed", data_yaml="/e.yaml", created_at=utc(50))
    cancel = await backend.insert_row(status="queued", cancel_requested=True, created_at=utc(60))
    owned_cancel = await backend.insert_row(status="queued", cancel_requested=True, created_at=utc(70))
    await backend.set_fields(owned_cancel, worker_id="w9", status="running", started_at=utc(5))
    assert await backend.store.claim(taken, "w1") is not None

    result = await backend.store.poll(10)
    assert result.claimable == (oldest, middle, newest)
    assert result.cancel_unclaimed == (cancel,)
    assert (await backend.store.poll(2)).claimable == (oldest, middle)
    assert done not in result.claimable


async def test_cancel_unclaimed_is_conditional_on_the_run_still_being_unclaimed(backend: Harness) -> None:
    run_id = await submit(backend)
    assert await backend.store.cancel_unclaimed(run_id) is False  # nobody pressed cancel
    assert await backend.store.request_cancel(run_id)
    assert await backend.store.claim(run_id, "w1") is None
    assert await backend.store.cancel_unclaimed(run_id)
    row = await backend.store.get(run_id)
    assert row is not None
    assert row.status is RunStatus.CANCELED
    assert row.error_message == CANCELED_MESSAGE
    assert row.canceled_at is not None and row.completed_at is not None
    assert await backend.store.cancel_unclaimed(run_id) is False
    assert (await backend.store.poll(10)).cancel_unclaimed == ()

    owned = await claimed(backend)
    assert await backend.store.request_cancel(owned.lease.run_id)
    assert await backend.store.cancel_unclaimed(owned.lease.run_id) is False
    row = await backend.store.get(owned.lease.run_id)
    assert row is not None and row.status is RunStatus.RUNNING


async def test_rescue_requeues_a_stale_run_and_fences_its_old_owner(backend: Harness) -> None:
    stale = await claimed(backend, "dead")
    fresh = await claimed(backend, "alive")
    await backend.make_stale(stale.lease.run_id, 300)

    report = await backend.store.rescue_stale(stale_after_s=120, max_attempts=3)
    assert report.requeued == (stale.lease.run_id,) and report.failed == ()
    row = await backend.store.get(stale.lease.run_id)
    assert row is not None
    assert row.status is RunStatus.QUEUED
    assert (row.worker_id, row.started_at, row.heartbeat_at) == (None, None, None)
    assert row.attempt == 1
    assert await backend.store.touch(stale.lease) is None
    untouched = await backend.store.get(fresh.lease.run_id)
    assert untouched is not None and untouched.status is RunStatus.RUNNING

    again = await backend.store.claim(stale.lease.run_id, "alive")
    assert again is not None and again.lease.attempt == 2
    assert (await backend.store.rescue_stale(stale_after_s=120, max_attempts=3)).requeued == ()


async def test_rescue_fails_a_stale_run_at_max_attempts(backend: Harness) -> None:
    claim = await claimed(backend, "dead-host")
    await backend.set_fields(claim.lease.run_id, attempt=3)
    await backend.make_stale(claim.lease.run_id, 300)
    report = await backend.store.rescue_stale(stale_after_s=120, max_attempts=3)
    assert report.failed == (claim.lease.run_id,) and report.requeued == ()
    row = await backend.store.get(claim.lease.run_id)
    assert row is not None
    assert row.status is RunStatus.FAILED
    assert row.completed_at is not None
    assert row.error_message == "worker dead-host stopped heartbeating; attempt 3 of 3 — giving up"


async def test_rescue_ends_a_stale_run_with_a_cancel_request_as_canceled(backend: Harness) -> None:
    claim = await claimed(backend, "dead")
    assert await backend.store.request_cancel(claim.lease.run_id)
    assert await backend.store.mark_canceling(claim.lease)
    await backend.make_stale(claim.lease.run_id, 300)
    report = await backend.store.rescue_stale(stale_after_s=120, max_attempts=3)
    assert report.failed == (claim.lease.run_id,)
    row = await backend.store.get(claim.lease.run_id)
    assert row is not None
    assert row.status is RunStatus.CANCELED and row.error_message == CANCELED_MESSAGE
    assert row.canceled_at is not None and row.completed_at is not None


async def test_rescue_leaves_runs_without_a_heartbeat_alone(backend: Harness) -> None:
    legacy = await backend.insert_row(status="running", worker_id="old-script", started_at=utc(3600))
    assert await backend.store.rescue_stale(stale_after_s=1, max_attempts=3) == RescueReport()
    row = await backend.store.get(legacy)
    assert row is not None and row.status is RunStatus.RUNNING and row.worker_id == "old-script"


async def test_register_worker_upserts_the_registry_row(backend: Harness) -> None:
    info = WorkerInfo("gpu-1", host="host-a", version="0.1.0", gpus=("H100",), slots=2)
    await backend.store.register_worker(info, WorkerState(WorkerStatus.ONLINE))
    row = await backend.worker_row("gpu-1")
    assert row is not None
    assert row["status"] == "online" and row["host"] == "host-a" and row["version"] == "0.1.0"
    assert row["gpus"] == ["H100"] and row["slots"] == 2
    assert row["current_run"] is None and row["current_runs"] == []
    first_seen = row["last_seen"]

    await backend.store.register_worker(info, WorkerState(WorkerStatus.BUSY, ("r1", "r2")))
    row = await backend.worker_row("gpu-1")
    assert row is not None
    assert row["status"] == "busy" and row["current_run"] == "r1" and row["current_runs"] == ["r1", "r2"]
    assert row["last_seen"] >= first_seen

    await backend.store.register_worker(info, WorkerState(WorkerStatus.OFFLINE))
    row = await backend.worker_row("gpu-1")
    assert row is not None and row["status"] == "offline" and row["current_run"] is None


async def test_rescue_marks_workers_that_stopped_heartbeating_offline(backend: Harness) -> None:
    dead = WorkerInfo("dead-host", host="a", version="0.1.0")
    alive = WorkerInfo("live-host", host="b", version="0.1.0")
    claim = await claimed(backend, "dead-host")
    await backend.store.register_worker(dead, WorkerState(WorkerStatus.BUSY, (claim.lease.run_id,)))
    await backend.store.register_worker(alive, WorkerState(WorkerStatus.BUSY, ("r-live",)))
    await backend.age_worker("dead-host", 300)

    report = await backend.store.rescue_stale(stale_after_s=120, max_attempts=3)
    assert report.offline_workers == ("dead-host",)
    row = await backend.worker_row("dead-host")
    assert row is not None
    assert (row["status"], row["current_run"], row["current_runs"]) == ("offline", None, [])
    live = await backend.worker_row("live-host")
    assert live is not None and live["status"] == "busy" and live["current_run"] == "r-live"
    # Already offline with no run: left alone, not reported again.
    assert (await backend.store.rescue_stale(stale_after_s=120, max_attempts=3)).offline_workers == ()


async def test_register_worker_writes_the_hardware_the_app_shows(backend: Harness) -> None:
    gpu = WorkerInfo(
        "gpu-2",
        "host-b",
        "0.1.0",
        gpus=("NVIDIA H200",) * 2,
        gpu_memory_gb=139.8,
        cpu_model="EPYC",
        ram_gb=128.0,
    )
    await backend.store.register_worker(gpu, WorkerState(WorkerStatus.ONLINE))
    row = await backend.worker_row("gpu-2")
    assert row is not None
    assert (row["device_type"], row["compute_type"], row["gpu_name"]) == ("gpu", "cuda", "2x NVIDIA H200")
    assert (row["gpu_memory_gb"], row["cpu_model"], row["ram_gb"]) == (139.8, "EPYC", 128.0)

    await backend.store.register_worker(
        WorkerInfo("cpu-1", "host-c", "0.1.0"), WorkerState(WorkerStatus.ONLINE)
    )
    row = await backend.worker_row("cpu-1")
    assert row is not None
    assert (row["device_type"], row["compute_type"], row["gpu_name"], row["gpu_memory_gb"]) == (
        "cpu",
        "cpu",
        None,
        None,
    )


async def test_the_registry_reports_devices_and_the_largest_worker(backend: Harness) -> None:
    assert await backend.store.largest_worker() == 0
    four = WorkerInfo("gpu-4", "host-b", "0.1.0", gpus=("NVIDIA H200",) * 4, slots=4, gpu_memory_gb=139.8)
    await backend.store.register_worker(four, WorkerState(WorkerStatus.BUSY, ("r1",), free_slots=3))
    row = await backend.worker_row("gpu-4")
    assert row is not None
    assert (row["slots"], row["free_slots"], row["device_type"]) == (4, 3, "gpu")
    assert row["gpu_name"] == "4x NVIDIA H200" and row["gpu_memory_gb"] == 139.8
    # Four slots sharing one GPU give a run one GPU at most; a CPU worker gives none.
    shared = WorkerInfo("gpu-shared", "host-c", "0.1.0", gpus=("A10",), slots=4)
    cpu = WorkerInfo("cpu-1", "host-d", "0.1.0", slots=8)
    for info in (shared, cpu):
        await backend.store.register_worker(info, WorkerState(WorkerStatus.ONLINE, free_slots=info.slots))
    cpu_row = await backend.worker_row("cpu-1")
    assert cpu_row is not None and cpu_row["device_type"] == "cpu" and cpu_row["gpu_name"] is None
    assert await backend.store.largest_worker() == 4
