"""The agent loop and the one-run pipeline over the in-memory backends and a scripted trainer."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from loguru import logger

from agent.backends.memory import MemoryBlobs, MemoryEvents, MemoryStore
from agent.config import Settings
from agent.core.agent import Agent, LoopSettings
from agent.core.pipeline import Deps, PipelineSettings, sign_checkpoint
from agent.core.progress import ProgressTracker, hhmmss
from agent.core.supervisor import Supervisor
from agent.core.workspaces import KEPT_MARKER, WorkspacePolicy, clean_workspaces
from agent.domain.errors import BackendUnavailable, DatasetError
from agent.domain.messages import BatchProgress, Done, EpochEnd, Started, TrainerMessage
from agent.domain.request import Task, TrainingRequest
from agent.domain.run import WorkerInfo
from agent.ports import ChildExit, PreparedDataset, TrainJob
from agent.wiring import loop_settings, pipeline_settings
from tests.util import wait_for


@dataclass
class ScriptedProcess:
    job: TrainJob
    epoch_seconds: float
    pid: int = 0
    stop_reasons: list[str] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def messages(self) -> AsyncIterator[TrainerMessage]:
        req = self.job.request
        save = self.job.workspace / "train"
        yield Started(total_epochs=req.epochs)
        for epoch in range(1, req.epochs + 1):
            for batch in range(1, 3):
                if self._stop.is_set():
                    return
                # Stands in for the work of one batch.
                with_timeout = asyncio.wait_for(self._stop.wait(), self.epoch_seconds / 2)
                try:
                    await with_timeout
                    return
                except TimeoutError:
                    pass
                yield BatchProgress(epoch, req.epochs, batch, 2, {"box_loss": 1.0 / epoch}, eta_seconds=1.0)
            (save / "weights").mkdir(parents=True, exist_ok=True)
            (save / "weights" / "last.pt").write_bytes(f"epoch {epoch}".encode())
            metrics = {"metrics/mAP50(B)": 0.1 * epoch, "metrics/mAP50-95(B)": 0.05 * epoch}
            yield EpochEnd(epoch, req.epochs, metrics, checkpoint=str(save / "weights" / "last.pt"))
        (save / "weights").mkdir(parents=True, exist_ok=True)
        for name in ("weights/best.pt", "weights/last.pt", "results.csv", "args.yaml"):
            (save / name).write_bytes(b"x")
        yield Done(save_dir=str(save))

    async def stop(self, reason: str) -> ChildExit:
        self.stop_reasons.append(reason)
        self._stop.set()
        return ChildExit(0, True, ())

    async def wait(self) -> ChildExit:
        return ChildExit(0, False, ())


@dataclass
class ScriptedTrainer:
    epoch_seconds: float = 0.02
    started: list[ScriptedProcess] = field(default_factory=list)
    resumed_from: list[bytes] = field(default_factory=list)  # the checkpoints handed over at start

    async def start(self, job: TrainJob) -> ScriptedProcess:
        proc = ScriptedProcess(job, self.epoch_seconds, pid=1000 + len(self.started))
        self.started.append(proc)
        if job.resume_from is not None:
            self.resumed_from.append(job.resume_from.read_bytes())
        return proc


class NoDatasets:
    async def prepare(self, request: TrainingRequest, run_id: str, workspace: Path) -> PreparedDataset:
        (workspace / "dataset").mkdir()
        if request.data_yaml == "bad.yaml":
            raise DatasetError("dataset YAML not found: bad.yaml")
        return PreparedDataset(workspace / "data.yaml", request.task or "detect", {})


def resolve(request: TrainingRequest, task: Task) -> str:
    return "model.yaml"


@dataclass
class Harness:
    store: MemoryStore
    events: MemoryEvents
    blobs: MemoryBlobs
    trainer: ScriptedTrainer
    agent: Agent
    task: asyncio.Task[str] | None = None

    async def __aenter__(self) -> Harness:
        self.task = asyncio.create_task(self.agent.run())
        await wait_for(lambda: self.agent.ready.is_set(), what="agent ready")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.agent.stop("test over")
        assert self.task is not None
        await asyncio.wait_for(self.task, 10)


AGENT_KEY = b"k" * 32


def pipeline_for(runs: Path, checkpoint_key: bytes | None = None, **overrides: Any) -> PipelineSettings:
    """The pipeline's settings as wiring builds them from the defaults, with a test's overrides."""
    return pipeline_settings(Settings(runs_dir=runs, **overrides), checkpoint_key)


def loop_for(
    worker: WorkerInfo, devices: tuple[str, ...], slots: int | None = None, **overrides: Any
) -> LoopSettings:
    """The agent loop's settings as wiring builds them from the defaults, with a test's overrides."""
    settings = Settings(**overrides)
    return loop_settings(settings, worker, devices, slots or settings.max_concurrent_runs or 1)


def harness(tmp_path: Path, epoch_seconds: float = 0.02, **loop: object) -> Harness:
    store = MemoryStore()
    events = MemoryEvents(store)
    blobs = MemoryBlobs()
    trainer = ScriptedTrainer(epoch_seconds)
    deps = Deps(
        store=store,
        blobs=blobs,
        datasets=NoDatasets(),
        trainer=trainer,
        resolve_model=resolve,
        settings=pipeline_for(
            tmp_path, AGENT_KEY, progress_interval=0.05, heartbeat_interval=0.2, allow_fake_trainer=False
        ),
    )
    settings = loop_for(WorkerInfo("w1", "host", "test"), ("cpu",), **loop)
    return Harness(store, events, blobs, trainer, Agent(deps, events, settings))


def run_config(epochs: int = 3) -> dict[str, object]:
    return {"epochs": epochs, "pretrained": False, "task": "detect"}


async def status_of(store: MemoryStore, run_id: str) -> str | None:
    row = await store.get(run_id)
    return row.status.value if row else None


async def test_a_run_goes_from_insert_to_completed_with_the_row_contract(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        run_id = h.store.insert_row(data_yaml="d.yaml", configuration=run_config())
        await wait_for(lambda: _done(h, run_id), what="completed")
        row = await h.store.get(run_id)
    assert row is not None and row.status.value == "completed"
    assert row.results is not None
    assert row.results["progress"]["percent"] == 100.0
    assert row.results["mAP"] == pytest.approx(0.15)
    assert {a["name"] for a in row.results["artifacts"]} == {"best.pt", "last.pt", "results.csv", "args.yaml"}
    assert row.trained_model_url == h.blobs.url(f"training_runs/{run_id}/weights/best.pt")
    assert row.attempt == 1 and row.worker_id == "w1"


def _done(h: Harness, run_id: str) -> bool:
    rec = h.store.runs[run_id]
    return rec.status in ("completed", "failed", "canceled")


async def test_progress_is_written_while_training(tmp_path: Path) -> None:
    async with harness(tmp_path, epoch_seconds=0.3) as h:
        run_id = h.store.insert_row(data_yaml="d.yaml", configuration=run_config(epochs=4))
        seen: list[int] = []

        def progressed() -> bool:
            results = h.store.runs[run_id].results or {}
            epoch = (results.get("progress") or {}).get("epoch")
            if epoch is not None and (not seen or seen[-1] != epoch):
                seen.append(epoch)
            return _done(h, run_id)

        await wait_for(progressed, timeout=10, interval=0.01)
    assert len(seen) >= 3, f"progress writes seen: {seen}"
    assert h.store.runs[run_id].results["metrics"]["metrics/mAP50(B)"] == pytest.approx(0.4)  # type: ignore[index]


async def test_cancel_event_on_an_owned_run_stops_the_trainer_and_writes_canceled(tmp_path: Path) -> None:
    async with harness(tmp_path, epoch_seconds=1.0) as h:
        run_id = h.store.insert_row(data_yaml="d.yaml", configuration=run_config(epochs=50))
        await wait_for(lambda: h.trainer.started, what="trainer started")
        h.store.set_fields(run_id, cancel_requested=True)
        await wait_for(lambda: _done(h, run_id), timeout=5)
    rec = h.store.runs[run_id]
    assert rec.status == "canceled" and rec.error_message == "Canceled by user."
    assert rec.canceled_at is not None and rec.completed_at is not None
    assert h.trainer.started[0].stop_reasons == ["cancel"]


async def test_a_lost_cancel_event_is_caught_by_the_heartbeat(tmp_path: Path) -> None:
    async with harness(tmp_path, epoch_seconds=1.0) as h:
        run_id = h.store.insert_row(data_yaml="d.yaml", configuration=run_config(epochs=50))
        await wait_for(lambda: h.trainer.started, what="trainer started")
        h.events.disconnect()
        h.store.set_fields(run_id, cancel_requested=True)
        await wait_for(lambda: _done(h, run_id), timeout=5)
    assert h.store.runs[run_id].status == "canceled"


async def test_a_lost_lease_stops_the_trainer_without_a_final_write(tmp_path: Path) -> None:
    async with harness(tmp_path, epoch_seconds=1.0) as h:
        run_id = h.store.insert_row(data_yaml="d.yaml", configuration=run_config(epochs=50))
        await wait_for(lambda: h.trainer.started, what="trainer started")
        # Another agent rescued it meanwhile: same row, new owner and attempt.
        h.store.set_fields(run_id, worker_id="other", attempt=7)
        await wait_for(lambda: h.trainer.started[0].stop_reasons, timeout=5, what="stopped")
        await wait_for(lambda: not h.agent.runs, what="run dropped")
    rec = h.store.runs[run_id]
    assert h.trainer.started[0].stop_reasons == ["lost"]
    assert (rec.status, rec.worker_id, rec.completed_at) == ("running", "other", None)


async def test_final_write_is_retried_until_it_lands(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        h.store.fail_next(BackendUnavailable("connection reset"), times=3, ops=["finish"])
        run_id = h.store.insert_row(data_yaml="d.yaml", configuration=run_config(epochs=1))
        await wait_for(lambda: _done(h, run_id), timeout=10)
    assert h.store.runs[run_id].status == "completed"


async def test_with_events_down_the_degraded_poll_picks_runs_up(tmp_path: Path) -> None:
    async with harness(tmp_path, poll_interval=3600.0, degraded_poll_interval=0.1) as h:
        h.events.disconnect()
        run_id = h.store.insert_row(data_yaml="d.yaml", configuration=run_config(epochs=1))
        await wait_for(lambda: _done(h, run_id), timeout=5)
    assert h.store.runs[run_id].status == "completed"
    assert h.events.dropped, "the insert event should have been lost"


async def test_an_invalid_request_fails_the_run_and_the_next_one_runs(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        bad = h.store.insert_row(data_yaml="d.yaml", configuration={"epochs": "many"})
        good = h.store.insert_row(data_yaml="d.yaml", configuration=run_config(epochs=1))
        await wait_for(lambda: _done(h, bad) and _done(h, good), timeout=5)
    assert h.store.runs[bad].status == "failed"
    assert "epochs" in (h.store.runs[bad].error_message or "")
    assert h.store.runs[good].status == "completed"


async def test_concurrent_slots_run_several_runs_at_once(tmp_path: Path) -> None:
    async with harness(tmp_path, epoch_seconds=0.2, max_concurrent_runs=3) as h:
        ids = [h.store.insert_row(data_yaml="d.yaml", configuration=run_config(epochs=2)) for _ in range(5)]
        await wait_for(lambda: len(h.agent.runs) == 3, timeout=5, what="three runs at once")
        await wait_for(lambda: all(_done(h, i) for i in ids), timeout=10)
    assert {h.store.runs[i].status for i in ids} == {"completed"}


async def test_release_mode_puts_runs_back_on_shutdown(tmp_path: Path) -> None:
    h = harness(tmp_path, epoch_seconds=1.0, shutdown_mode="release")
    async with h:
        run_id = h.store.insert_row(data_yaml="d.yaml", configuration=run_config(epochs=50))
        await wait_for(lambda: h.trainer.started, what="trainer started")
    rec = h.store.runs[run_id]
    assert (rec.status, rec.worker_id, rec.started_at) == ("queued", None, None)
    assert h.store.workers["w1"].status == "offline"


async def test_supervisor_restarts_a_crashed_task_and_gives_up_when_it_keeps_crashing() -> None:
    fatal: list[str] = []
    runs = 0

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        raise RuntimeError("boom")

    sup = Supervisor(on_fatal=fatal.append, max_restarts=2, window=60)
    sup.spawn("flaky", flaky)
    await wait_for(lambda: fatal, timeout=5)
    assert runs == 3 and "flaky" in fatal[0]
    await sup.stop()


def test_progress_tracker_percent_and_eta() -> None:
    t = ProgressTracker(total_epochs=4)
    t.update(BatchProgress(2, 4, 1, 2, {}, eta_seconds=3725))
    assert t.percent == pytest.approx(37.5)
    assert t.progress()["eta"] == "01:02:05"
    t.update(EpochEnd(2, 4, {"metrics/mAP50(B)": 0.3}))
    assert t.percent == 50.0 and t.urgent and t.metrics["metrics/mAP50(B)"] == 0.3
    assert t.metrics["epoch"] == 2 and t.metrics["time"] >= 0
    assert hhmmss(None) is None and hhmmss(59.6) == "00:01:00"


async def test_a_rescued_run_resumes_only_from_a_checkpoint_an_agent_signed(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(b"checkpoint of attempt 1")
    forged = tmp_path / "forged.pt"
    forged.write_bytes(b"written by someone with bucket access")
    async with harness(tmp_path / "runs") as h:
        # Held back (status completed) until their objects are in place, then queued.
        signed, unsigned, tampered = (
            h.store.insert_row(
                data_yaml="d.yaml", configuration=run_config(epochs=1), attempt=1, status="completed"
            )
            for _ in range(3)
        )
        for run_id in (signed, unsigned, tampered):
            key = f"training_runs/{run_id}/checkpoints/last.pt"
            await h.blobs.upload(key, forged if run_id == tampered else ckpt, "application/octet-stream")
        for run_id in (signed, tampered):
            sig = tmp_path / f"{run_id}.sig"
            sig.write_text(sign_checkpoint(AGENT_KEY, run_id, ckpt))
            await h.blobs.upload(f"training_runs/{run_id}/checkpoints/last.pt.sig", sig, "application/json")
        for run_id in (signed, unsigned, tampered):
            h.store.set_fields(run_id, status="queued")
        await wait_for(lambda: all(_done(h, r) for r in (signed, unsigned, tampered)), timeout=10)
    jobs = {started.job.run_id: started.job for started in h.trainer.started}
    assert h.store.runs[signed].attempt == 2
    # Workspaces are gone after their runs: the trainer kept what it was handed.
    assert jobs[signed].resume_from is not None and h.trainer.resumed_from == [b"checkpoint of attempt 1"]
    assert jobs[unsigned].resume_from is None and jobs[tampered].resume_from is None


async def test_checkpoints_are_uploaded_during_training(tmp_path: Path) -> None:
    h = harness(tmp_path)
    h.agent.deps = dataclasses.replace(
        h.agent.deps, settings=dataclasses.replace(h.agent.deps.settings, checkpoint_interval=0.01)
    )
    async with h:
        run_id = h.store.insert_row(data_yaml="d.yaml", configuration=run_config(epochs=3))
        await wait_for(lambda: _done(h, run_id), timeout=5)
    assert f"training_runs/{run_id}/checkpoints/last.pt" in h.blobs.objects
    assert f"training_runs/{run_id}/checkpoints/last.pt.sig" in h.blobs.objects


async def test_a_cancel_during_a_wait_mode_shutdown_still_stops_the_run(tmp_path: Path) -> None:
    h = harness(tmp_path, epoch_seconds=20.0, shutdown_mode="wait")
    # Writes slower than the test (no batch or epoch end within it): only the cancel event can stop
    # the run in time, through the dispatcher.
    settings = dataclasses.replace(h.agent.deps.settings, heartbeat_interval=60.0, progress_interval=60.0)
    h.agent.deps = dataclasses.replace(h.agent.deps, settings=settings)
    async with h:
        run_id = h.store.insert_row(data_yaml="d.yaml", configuration=run_config(epochs=50))
        await wait_for(lambda: h.trainer.started, what="trainer started")
        h.agent.stop("test: shutting down")
        h.store.set_fields(run_id, cancel_requested=True)
        await wait_for(lambda: _done(h, run_id), timeout=5, what="canceled during shutdown")
    assert h.store.runs[run_id].status == "canceled"


async def test_workspaces_are_removed_after_runs_and_failed_ones_kept_when_asked(tmp_path: Path) -> None:
    keep = WorkspacePolicy(keep_failed=True, max_kept=2)
    h = harness(tmp_path / "runs")
    h.agent.deps = dataclasses.replace(
        h.agent.deps, settings=dataclasses.replace(h.agent.deps.settings, workspaces=keep)
    )
    async with h:
        done = h.store.insert_row(data_yaml="d.yaml", configuration=run_config(epochs=1))
        await wait_for(lambda: _done(h, done), timeout=5)
        failed = []
        for _ in range(3):
            failed.append(h.store.insert_row(data_yaml="bad.yaml", configuration=run_config(epochs=1)))
            await wait_for(lambda: _done(h, failed[-1]), timeout=5)
    assert h.store.runs[done].status == "completed" and not (tmp_path / "runs" / done).exists()
    assert [h.store.runs[r].status for r in failed] == ["failed"] * 3
    # The newest two failures are kept, whole; the oldest went when the third was kept.
    kept = sorted(p.parent.parent.name for p in (tmp_path / "runs").glob("*/attempt-*/.kept"))
    assert kept == sorted(failed[1:])
    assert all((tmp_path / "runs" / r / "attempt-1" / "dataset").is_dir() for r in failed[1:])


def test_kept_workspaces_are_capped_oldest_removed_first(tmp_path: Path) -> None:
    policy = WorkspacePolicy(keep_failed=True, max_kept=2)
    for i, run in enumerate(("r1", "r2", "r3")):
        ws = tmp_path / run / "attempt-1"
        (ws / "train").mkdir(parents=True)
        (ws / "train" / "file").write_text("x")
        clean_workspaces(tmp_path, run, 1, True, policy, logger)
        os.utime(ws / KEPT_MARKER, (1000 + i, 1000 + i))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r2", "r3"]
    # A completed run, and a failed one with keeping off, leave nothing behind.
    for run, failed, policy_ in (
        ("ok", False, policy),
        ("f", True, WorkspacePolicy(keep_failed=False, max_kept=5)),
    ):
        (tmp_path / run / "attempt-2" / "dataset").mkdir(parents=True)
        (tmp_path / run / "attempt-1").mkdir()  # an earlier attempt on this host
        clean_workspaces(tmp_path, run, 2, failed, policy_, logger)
        assert not (tmp_path / run).exists()
