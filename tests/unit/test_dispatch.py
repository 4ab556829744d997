"""The agent loop's dispatcher and device slots, over the in-memory backends and a scripted trainer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from agent.backends.memory import MemoryBlobs, MemoryEvents, MemoryStore
from agent.core.agent import Agent
from agent.core.pipeline import Deps
from agent.domain.errors import BackendUnavailable
from agent.domain.messages import Done, Started, TrainerMessage
from agent.domain.run import Hint, WorkerInfo, WorkerState
from agent.domain.status import WorkerStatus
from agent.ports import ChildExit, TrainJob
from tests.unit.test_core import NoDatasets, ScriptedTrainer, loop_for, pipeline_for, resolve
from tests.util import wait_for

DEVICES = ("0", "1", "2", "3")


@dataclass
class Ledger:
    """Which fake devices the running children hold, as CUDA_VISIBLE_DEVICES pinned them."""

    active: dict[str, tuple[str, ...]] = field(default_factory=dict)
    jobs: list[TrainJob] = field(default_factory=list)
    max_busy: int = 0
    overbooked: int = 0

    def enter(self, job: TrainJob) -> None:
        assert job.visible_devices is not None
        held = tuple(job.visible_devices.split(","))
        in_use = {d for devices in self.active.values() for d in devices}
        if in_use & set(held) or len(set(held)) != len(held):
            self.overbooked += 1
        self.active[job.run_id] = held
        self.jobs.append(job)
        self.max_busy = max(self.max_busy, sum(map(len, self.active.values())))

    def leave(self, job: TrainJob) -> None:
        self.active.pop(job.run_id, None)


@dataclass
class DeviceProcess:
    job: TrainJob
    ledger: Ledger
    seconds: float
    pid: int = 0
    stop_reasons: list[str] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def messages(self) -> AsyncIterator[TrainerMessage]:
        self.ledger.enter(self.job)
        try:
            yield Started(total_epochs=1, device=self.job.request.device or "")
            try:
                await asyncio.wait_for(self._stop.wait(), self.seconds)
                return
            except TimeoutError:
                pass
            save = self.job.workspace / "train"
            (save / "weights").mkdir(parents=True, exist_ok=True)
            (save / "weights" / "best.pt").write_bytes(b"x")
            yield Done(save_dir=str(save))
        finally:
            self.ledger.leave(self.job)

    async def stop(self, reason: str) -> ChildExit:
        self.stop_reasons.append(reason)
        self._stop.set()
        self.ledger.leave(self.job)
        return ChildExit(0, True, ())

    async def wait(self) -> ChildExit:
        return ChildExit(0, False, ())


@dataclass
class DeviceTrainer:
    seconds: float
    ledger: Ledger = field(default_factory=Ledger)
    started: list[DeviceProcess] = field(default_factory=list)

    async def start(self, job: TrainJob) -> DeviceProcess:
        proc = DeviceProcess(job, self.ledger, self.seconds, pid=2000 + len(self.started))
        self.started.append(proc)
        return proc


def make_agent(
    tmp_path: Path,
    trainer: DeviceTrainer | ScriptedTrainer,
    devices: tuple[str, ...] = DEVICES,
    slots: int | None = None,
    **loop: object,
) -> tuple[Agent, MemoryStore, MemoryEvents]:
    store = MemoryStore()
    events = MemoryEvents(store)
    deps = Deps(
        store=store,
        blobs=MemoryBlobs(),
        datasets=NoDatasets(),
        trainer=trainer,
        resolve_model=resolve,
        settings=pipeline_for(
            tmp_path, progress_interval=0.05, heartbeat_interval=0.2, allow_fake_trainer=True
        ),
    )
    gpus = tuple(f"GPU {d}" for d in devices if d != "cpu")
    capacity = slots or len(devices)
    worker = WorkerInfo("w1", "host", "test", gpus=gpus, slots=capacity)
    settings = loop_for(worker, devices, capacity, **loop)
    return Agent(deps, events, settings), store, events


async def serving(agent: Agent) -> asyncio.Task[str]:
    task = asyncio.create_task(agent.run())
    await wait_for(lambda: agent.ready.is_set(), what="agent ready")
    return task


async def shutdown(agent: Agent, task: asyncio.Task[str]) -> None:
    agent.stop("test over")
    await asyncio.wait_for(task, 10)


def finished(store: MemoryStore, *run_ids: str) -> bool:
    return all(store.runs[r].status in ("completed", "failed", "canceled") for r in run_ids)


def fake_run(device: object) -> dict[str, object]:
    return {"trainer": "fake", "epochs": 1, "device": device}


async def test_runs_take_distinct_free_devices_and_never_overbook(tmp_path: Path) -> None:
    trainer = DeviceTrainer(seconds=0.15)
    agent, store, _ = make_agent(tmp_path, trainer)
    task = await serving(agent)
    needs = [1, 2, 4, 1, 1, 2, 4, 2, 1, 1]
    as_device = {1: 0, 2: "0,1", 4: [0, 1, 2, 3]}
    ids = [store.insert_row(data_yaml="d.yaml", configuration=fake_run(as_device[n])) for n in needs]
    await wait_for(lambda: finished(store, *ids), timeout=20, what="all runs done")
    await wait_for(lambda: store.workers["w1"].free_slots == 4, what="every slot free again")
    assert store.workers["w1"].slots == 4
    await shutdown(agent, task)
    assert store.workers["w1"].free_slots == 0, "an offline worker offers nothing"

    assert {store.runs[i].status for i in ids} == {"completed"}
    ledger = trainer.ledger
    assert ledger.overbooked == 0 and ledger.max_busy == 4
    by_run = {job.run_id: job for job in ledger.jobs}
    for run_id, need in zip(ids, needs, strict=True):
        job = by_run[run_id]
        assert job.visible_devices is not None
        held = job.visible_devices.split(",")
        assert len(held) == len(set(held)) == need and set(held) <= set(DEVICES)
        # The child sees its devices renumbered from 0.
        assert job.request.device == ",".join(str(i) for i in range(need))


async def test_the_registry_reports_free_slots_while_runs_hold_devices(tmp_path: Path) -> None:
    trainer = DeviceTrainer(seconds=30)
    agent, store, _ = make_agent(tmp_path, trainer, heartbeat_interval=0.1, stale_after=1.0)
    task = await serving(agent)
    run_id = store.insert_row(data_yaml="d.yaml", configuration=fake_run("0,1,2"))
    await wait_for(lambda: trainer.started, what="run started")
    await wait_for(lambda: store.workers["w1"].free_slots == 1, what="one slot free")
    assert store.workers["w1"].status == "busy" and store.workers["w1"].device_type == "gpu"
    store.set_fields(run_id, cancel_requested=True)
    await wait_for(lambda: finished(store, run_id), what="canceled")
    await shutdown(agent, task)


async def test_a_run_bigger_than_this_host_is_left_for_a_bigger_worker(tmp_path: Path) -> None:
    agent, store, _ = make_agent(tmp_path, DeviceTrainer(seconds=0.05), poll_interval=0.2)
    big = WorkerInfo("big", "big-host", "test", gpus=tuple(f"GPU {i}" for i in range(8)), slots=8)
    await store.register_worker(big, WorkerState(WorkerStatus.ONLINE))
    task = await serving(agent)
    run_id = store.insert_row(data_yaml="d.yaml", configuration=fake_run(list(range(8))))
    small = store.insert_row(data_yaml="d.yaml", configuration=fake_run(0))
    await wait_for(lambda: finished(store, small), what="the small run done")
    polls = store.calls["poll"]
    await wait_for(lambda: store.calls["poll"] > polls, timeout=15, what="a later poll seeing the big run")
    await shutdown(agent, task)
    rec = store.runs[run_id]
    assert (rec.status, rec.worker_id, rec.attempt) == ("queued", None, 0)


async def test_a_run_no_worker_could_ever_take_fails_with_a_clear_message(tmp_path: Path) -> None:
    agent, store, _ = make_agent(tmp_path, DeviceTrainer(seconds=0.05))
    task = await serving(agent)
    run_id = store.insert_row(data_yaml="d.yaml", configuration=fake_run("0,1,2,3,4,5"))
    await wait_for(lambda: finished(store, run_id), what="failed")
    await shutdown(agent, task)
    rec = store.runs[run_id]
    assert rec.status == "failed"
    assert "6 GPUs" in (rec.error_message or "") and "more than 4" in (rec.error_message or "")


async def test_a_cancel_is_acted_on_at_once_while_a_claim_retries_against_a_backend_that_is_down(
    tmp_path: Path,
) -> None:
    trainer = ScriptedTrainer(epoch_seconds=1.0)
    agent, store, _ = make_agent(tmp_path, trainer, devices=("cpu",), slots=2)
    task = await serving(agent)
    running = store.insert_row(data_yaml="d.yaml", configuration={"epochs": 50, "pretrained": False})
    await wait_for(lambda: trainer.started, what="first run started")

    # Reads and claims fail from now on: the next run's claim keeps retrying in its lane.
    store.fail_next(BackendUnavailable("connection refused"), times=100_000, ops=["get", "claim", "poll"])
    tried = store.calls["get"] + store.calls["claim"]
    waiting = store.insert_row(data_yaml="d.yaml", configuration={"epochs": 1, "pretrained": False})
    await wait_for(
        lambda: store.calls["get"] + store.calls["claim"] >= tried + 2, what="the claim of `waiting` retrying"
    )
    asked = time.monotonic()
    store.set_fields(running, cancel_requested=True)
    await wait_for(lambda: trainer.started[0].stop_reasons, timeout=5, what="trainer stopped")
    stop_s = time.monotonic() - asked
    await wait_for(lambda: finished(store, running), timeout=5, what="canceled")
    assert store.runs[running].status == "canceled"
    assert stop_s < 1.0, f"the cancel waited {stop_s:.2f}s behind a retrying claim"
    assert store.runs[waiting].worker_id is None

    store.heal()
    await wait_for(lambda: finished(store, waiting), timeout=20, what="claimed once the backend is back")
    await shutdown(agent, task)
    assert store.runs[waiting].status == "completed"


async def test_held_runs_are_followed_and_a_check_finds_a_takeover_the_stream_missed(tmp_path: Path) -> None:
    trainer = DeviceTrainer(seconds=30)
    agent, store, events = make_agent(tmp_path, trainer)
    task = await serving(agent)
    run_id = store.insert_row(data_yaml="d.yaml", configuration=fake_run(0))
    await wait_for(lambda: trainer.started, what="run started")
    assert events.followed == frozenset({run_id})
    # The old script's claim lands while the run's own feed is not up yet: no event for it.
    events.disconnect()
    store.set_fields(run_id, worker_id="old-script")
    assert events.dropped[-1].worker_id == "old-script"
    events.reconnect()
    assert events.emit(Hint(run_id, "CHECK", claimable=False))
    await wait_for(lambda: trainer.started[0].stop_reasons, what="the child stopped")
    await wait_for(lambda: events.followed == frozenset(), what="no longer followed")
    await shutdown(agent, task)
    assert trainer.started[0].stop_reasons == ["lost"]
    rec = store.runs[run_id]
    assert (rec.status, rec.worker_id) == ("running", "old-script")  # never written again


async def test_an_insert_carrying_the_row_is_claimed_without_reading_it_first(tmp_path: Path) -> None:
    trainer = DeviceTrainer(seconds=0.05)
    agent, store, _ = make_agent(tmp_path, trainer, poll_interval=600.0)
    # Hints only from the test: the store's own feed would announce the insert without the row.
    agent.events = events = MemoryEvents()
    task = await serving(agent)
    await wait_for(lambda: store.calls["poll"] >= 1, what="the startup poll, before the insert")
    big = store.insert_row(data_yaml="d.yaml", configuration=fake_run("0,1,2"))
    row = await store.get(big)
    reads = store.calls["get"]
    assert events.emit(Hint(big, "INSERT", claimable=True, image=row))
    await wait_for(lambda: finished(store, big), what="the run done")
    await shutdown(agent, task)
    assert store.calls["get"] == reads, "the INSERT's image served the claim decision"
    assert trainer.ledger.jobs[0].visible_devices is not None
    assert len(trainer.ledger.jobs[0].visible_devices.split(",")) == 3
