"""One run, top to bottom: claimed → prepare → train → progress → artifacts → finalize.

The agent loop (agent.py) hears events, claims, and hands each claimed run to `execute`.
Everything that happens to that run afterwards is in this module, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import mimetypes
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, assert_never
from urllib.parse import urlsplit, urlunsplit

from loguru import logger

from agent.core.progress import ProgressTracker, hhmmss
from agent.core.slots import Allocation, child_device
from agent.core.workspaces import WorkspacePolicy, clean_workspaces
from agent.domain.errors import (
    AgentError,
    BackendError,
    BackendUnavailable,
    DatasetError,
    InvalidRequest,
    ModelNotFound,
    WeightsError,
)
from agent.domain.messages import EpochEnd
from agent.domain.redact import error_message, quote, redact
from agent.domain.request import Task, TrainingRequest, parse_request
from agent.domain.results import summarize
from agent.domain.run import Artifact, Canceled, Claimed, Completed, Failed, Lease, Outcome, Pulse
from agent.ports import (
    BlobStore,
    ChildExit,
    Datasets,
    Metrics,
    NoMetrics,
    PreparedDataset,
    RunEnd,
    RunStore,
    Trainer,
    TrainingProcess,
    TrainJob,
)
from agent.retry import transient, until_it_lands

if TYPE_CHECKING:
    from loguru import Logger

T = TypeVar("T")
ModelResolver = Callable[[TrainingRequest, Task], str]


@dataclass(frozen=True)
class PipelineSettings:
    """What a run's pipeline is told; the defaults live in agent.config (built in wiring)."""

    runs_root: Path
    progress_interval: float
    heartbeat_interval: float
    checkpoint_interval: float
    workspaces: WorkspacePolicy
    allow_fake_trainer: bool
    # The key checkpoints are signed with (AGENT_SECRET); None: no checkpoint is ever resumed.
    checkpoint_key: bytes | None = field(repr=False)


@dataclass(frozen=True)
class Deps:
    store: RunStore
    blobs: BlobStore
    datasets: Datasets
    trainer: Trainer
    resolve_model: ModelResolver
    settings: PipelineSettings
    # The operator's models bucket (SUPABASE_MODELS_BUCKET): model files not in WEIGHTS_DIR.
    models: BlobStore | None = None
    metrics: Metrics = field(default_factory=NoMetrics)
    devices: Allocation | None = None  # what this run holds; set per run by the agent loop


Interrupt = Literal["cancel", "release", "lost"]


@dataclass
class RunControl:
    """How the agent loop talks to a run in flight: cancel, release on shutdown, lease lost."""

    lease: Lease
    events: dict[Interrupt, asyncio.Event] = field(
        default_factory=lambda: {
            "cancel": asyncio.Event(),
            "release": asyncio.Event(),
            "lost": asyncio.Event(),
        }
    )
    pid: int | None = None
    cancel_heard_at: float | None = None

    def interrupt(self, why: Interrupt) -> None:
        if why == "cancel" and self.cancel_heard_at is None:
            self.cancel_heard_at = time.monotonic()
        self.events[why].set()

    def interrupted(self) -> Interrupt | None:
        order: tuple[Interrupt, ...] = ("lost", "cancel", "release")
        return next((why for why in order if self.events[why].is_set()), None)

    async def wait_interrupt(self) -> Interrupt:
        waiters = {asyncio.ensure_future(e.wait()): why for why, e in self.events.items()}
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        why = self.interrupted()
        assert why is not None
        return why


class _Interrupted(Exception):
    def __init__(self, why: Interrupt) -> None:
        self.why = why


async def execute(deps: Deps, claimed: Claimed, control: RunControl) -> None:
    """Run one claimed run to its final row, then remove its workspace.

    Never raises for a problem of the run itself.
    """
    lease = claimed.lease
    log = logger.bind(run_id=lease.run_id, worker=lease.worker_id, attempt=lease.attempt)
    outcome: Outcome | None = None
    try:
        try:
            outcome = await _run(deps, claimed, control, log)
        except Exception as exc:
            # A failure of this run, whatever it is, fails this run: rescue is for hosts that died,
            # and a run that crashes its pipeline would crash it again on every host that claims it.
            log.bind(error=type(exc).__name__).opt(exception=exc).error("run failed on an unexpected error")
            outcome = Failed(unexpected_failure(exc))
        if outcome is not None:
            await finalize(deps, lease, outcome, log)
    finally:
        await _clear_workspace(deps, lease, isinstance(outcome, Failed), log)


def unexpected_failure(exc: BaseException) -> str:
    """The row's message for an error nobody anticipated: its kind and a short quote, no frames."""
    return f"The run failed on an unexpected error: {type(exc).__name__}: {quote(str(exc))[1:-1]}."


async def _run(deps: Deps, claimed: Claimed, control: RunControl, log: Logger) -> Outcome | None:
    lease = claimed.lease
    try:
        request = parse_request(claimed.row)
        if request.trainer == "fake" and not deps.settings.allow_fake_trainer:
            raise InvalidRequest(
                "trainer", "fake", "the fake trainer is turned off on this agent (ALLOW_FAKE_TRAINER)"
            )
    except InvalidRequest as exc:
        log.info("run claimed")
        return Failed(str(exc))
    log.bind(model=request.base_model, epochs=request.epochs, data=without_secrets(request.data_yaml)).info(
        "run claimed"
    )
    for note in request.notes:
        log.info("request note: {}", note)

    workspace = deps.settings.runs_root / lease.run_id / f"attempt-{lease.attempt}"
    heartbeat = asyncio.create_task(_heartbeat(deps, control, None), name=f"heartbeat-{lease.run_id}")
    try:
        try:
            job = await _until_interrupted(control, _prepare(deps, lease, request, workspace, log))
        except (DatasetError, WeightsError) as exc:
            return Failed(str(exc))

        if deps.devices is not None:
            device = child_device(job.request.device, deps.devices.devices)
            request = replace(job.request, device=device)
            job = replace(job, request=request, visible_devices=deps.devices.visible)
        try:
            proc = await deps.trainer.start(job)
        except OSError as exc:
            return Failed(f"Could not start the trainer process: {exc}")
        control.pid = proc.pid
        log.bind(pid=proc.pid, trainer=request.trainer).info("trainer started")
        heartbeat.cancel()
        try:
            return await _train(deps, lease, job, proc, control, log)
        except BaseException:
            # Whatever went wrong here, the trainer must not outlive its run.
            await asyncio.shield(proc.stop("error"))
            raise
    except _Interrupted as stop:
        return await _interrupted_before_training(deps, lease, stop.why, log)
    finally:
        heartbeat.cancel()


async def _clear_workspace(deps: Deps, lease: Lease, failed: bool, log: Logger) -> None:
    settings = deps.settings
    try:
        await asyncio.to_thread(
            clean_workspaces,
            settings.runs_root,
            lease.run_id,
            lease.attempt,
            failed,
            settings.workspaces,
            log,
        )
    except OSError as exc:
        log.warning("run workspace not removed: {}", exc)


async def _prepare(
    deps: Deps, lease: Lease, request: TrainingRequest, workspace: Path, log: Logger
) -> TrainJob:
    """Dataset into the workspace, weights located, previous attempt's checkpoint fetched."""
    await asyncio.to_thread(workspace.mkdir, parents=True, exist_ok=True)
    if request.trainer == "fake":
        # No dataset or model, but a checkpoint as a real training would resume it.
        resume = await _fetch_checkpoint(deps, lease, workspace, log) if lease.attempt > 1 else None
        return TrainJob(lease.run_id, lease.attempt, request, workspace, None, "fake", resume)
    started = time.monotonic()
    dataset: PreparedDataset = await deps.datasets.prepare(request, lease.run_id, workspace)
    counts = {k: v for k, v in dataset.summary.items() if k in _DATASET_COUNTS}
    log.bind(task=dataset.task, seconds=round(time.monotonic() - started, 2), **counts).info("dataset ready")
    model = await _model(deps, request, dataset.task, workspace, log)
    resume = await _fetch_checkpoint(deps, lease, workspace, log) if lease.attempt > 1 else None
    return TrainJob(lease.run_id, lease.attempt, request, workspace, dataset, model, resume)


def without_secrets(data_yaml: str) -> str:
    """A dataset reference fit for a log line: a URL loses its query (signed tokens) and user info."""
    parts = urlsplit(data_yaml)
    if not parts.scheme or not parts.netloc:
        return data_yaml
    return urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path, "", ""))


# The counts a person checks first; the full summary is in the DEBUG lines of the dataset preparer.
_DATASET_COUNTS = ("images", "labels", "instances", "dropped", "downloaded")


async def _model(deps: Deps, request: TrainingRequest, task: Task, workspace: Path, log: Logger) -> str:
    """WEIGHTS_DIR first (resolve_model); a file name it lacks comes from the models bucket, if any."""
    try:
        return deps.resolve_model(request, task)
    except ModelNotFound:
        if deps.models is None:
            raise
    # The models bucket is the operator's (SUPABASE_MODELS_BUCKET), so its files are trusted like
    # WEIGHTS_DIR's; base_model is a plain file name (request.py), so the key cannot climb.
    name = request.base_model
    dest = workspace / "model" / name
    models = deps.models
    try:
        found = await transient("model download", lambda: models.download(name, dest))
    except (BackendError, BackendUnavailable) as exc:
        raise WeightsError(
            f"Could not download the model {quote(name)} from the models bucket: {exc}."
        ) from exc
    if not found:
        raise WeightsError(f"Model {quote(name)} is neither in WEIGHTS_DIR nor in the models bucket.")
    log.bind(model=name).info("model downloaded from the models bucket")
    return str(dest.resolve())


async def _fetch_checkpoint(deps: Deps, lease: Lease, workspace: Path, log: Logger) -> Path | None:
    """The previous attempt's checkpoint, only if an agent signed it (a .pt is unpickled on load)."""
    dest = workspace / "resume" / "last.pt"
    signature = workspace / "resume" / "last.pt.sig"
    key = deps.settings.checkpoint_key
    if key is None:
        log.warning("no AGENT_SECRET to verify checkpoints with: not resuming, training starts over")
        return None
    try:
        found = await transient(
            "checkpoint download", lambda: deps.blobs.download(checkpoint_key(lease.run_id), dest)
        )
        signed = found and await transient(
            "checkpoint signature download",
            lambda: deps.blobs.download(checkpoint_signature_key(lease.run_id), signature),
        )
    except (BackendError, BackendUnavailable) as exc:
        log.warning("no checkpoint to resume from: {}", exc)
        return None
    if not found:
        return None
    # Buckets and rows may be writable by the web app's roles: a checkpoint is loaded only if its
    # hash carries this fleet's signature, i.e. an agent uploaded exactly these bytes for this run.
    if not signed or not await asyncio.to_thread(verify_checkpoint, key, lease.run_id, dest, signature):
        log.warning("checkpoint is not signed by an agent: ignored, training starts over")
        await asyncio.to_thread(dest.unlink, True)
        return None
    log.bind(path=str(dest)).info("resuming from the previous attempt's checkpoint")
    return dest


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sign_checkpoint(key: bytes, run_id: str, checkpoint: Path) -> str:
    """The signature file's content: the checkpoint's SHA-256 and an HMAC of it under the agents' key."""
    sha256 = _file_sha256(checkpoint)
    mac = hmac.new(key, f"{run_id}:{sha256}".encode(), hashlib.sha256).hexdigest()
    return json.dumps({"run_id": run_id, "sha256": sha256, "hmac": mac})


def verify_checkpoint(key: bytes, run_id: str, checkpoint: Path, signature: Path) -> bool:
    """Whether `signature` is an agent's signature of exactly these bytes, for this run."""
    try:
        claimed = json.loads(signature.read_text()[:4096])
        mac = str(claimed["hmac"])
    except (OSError, ValueError, TypeError, KeyError):
        return False
    sha256 = _file_sha256(checkpoint)
    expected = hmac.new(key, f"{run_id}:{sha256}".encode(), hashlib.sha256).hexdigest()
    return hmac.compare_digest(mac, expected)


async def _train(
    deps: Deps, lease: Lease, job: TrainJob, proc: TrainingProcess, control: RunControl, log: Logger
) -> Outcome | None:
    """Stream the child's messages into the row until it ends or the run is interrupted."""
    started = time.monotonic()
    tracker = ProgressTracker(total_epochs=job.request.epochs)
    wake = asyncio.Event()
    writer = asyncio.create_task(_heartbeat(deps, control, (tracker, wake)), name=f"progress-{lease.run_id}")
    checkpoints = _CheckpointUploader(deps, lease, log)

    async def consume() -> None:
        async for msg in proc.messages():
            tracker.update(msg)
            if isinstance(msg, EpochEnd):
                _log_epoch(log, tracker)
            if tracker.urgent:
                wake.set()
                if tracker.checkpoint:
                    checkpoints.maybe_upload(Path(tracker.checkpoint))

    consumer = asyncio.create_task(consume(), name=f"messages-{lease.run_id}")
    interrupt = asyncio.create_task(control.wait_interrupt())
    try:
        await asyncio.wait({consumer, interrupt}, return_when=asyncio.FIRST_COMPLETED)
        why = control.interrupted()
        if why is not None and not (consumer.done() and tracker.done is not None):
            return await _stop_training(deps, lease, proc, control, why, log)
        exit_ = await proc.wait()
    finally:
        interrupt.cancel()
        consumer.cancel()
        writer.cancel()
        await checkpoints.drain()
        with contextlib.suppress(asyncio.CancelledError):
            await writer

    if tracker.done is None:
        return await _crashed(deps, lease, job, exit_, tracker, log)
    log.bind(seconds=round(time.monotonic() - started, 2), epochs=tracker.epochs_done).debug(
        "training finished"
    )
    try:
        return await _completed(deps, lease, job, tracker)
    except (BackendError, BackendUnavailable, OSError) as exc:
        return Failed(f"Training finished but uploading its artifacts failed: {exc}")


def _log_epoch(log: Logger, tracker: ProgressTracker) -> None:
    """One line per epoch: where it is, how it learns, when it ends."""
    metrics = tracker.metrics
    train_losses = [v for k, v in metrics.items() if k.startswith("train/") and k.endswith("loss")]
    losses = train_losses or list(tracker.losses.values())
    map50 = metrics.get("metrics/mAP50(M)", metrics.get("metrics/mAP50(B)"))
    log.bind(
        epoch=f"{tracker.epochs_done}/{tracker.total_epochs}",
        loss=round(sum(losses), 4) if losses else None,
        mAP50=round(map50, 4) if isinstance(map50, (int, float)) else None,
        eta=hhmmss(tracker.eta_seconds),
    ).info("epoch done")


async def _stop_training(
    deps: Deps, lease: Lease, proc: TrainingProcess, control: RunControl, why: Interrupt, log: Logger
) -> Outcome | None:
    # The stop goes out first: the `canceling` write must not delay the child by a round trip.
    stopping = asyncio.ensure_future(proc.stop(why))
    if why == "cancel":
        await _write_canceling(deps, lease, log)
    exit_ = await stopping
    latency = None if control.cancel_heard_at is None else time.monotonic() - control.cancel_heard_at
    if why == "cancel" and latency is not None:
        deps.metrics.cancel_stopped(latency)
    log.bind(reason=why, returncode=exit_.returncode, stop_s=latency and round(latency, 3)).info(
        "trainer stopped"
    )
    if why == "cancel":
        return Canceled()
    if why == "release":
        released = await until_it_lands("release", lambda: deps.store.release(lease))
        log.bind(released=released).info("run released for another worker")
        return None
    if why == "lost":
        log.warning("lease lost (run taken away or deleted): dropped without a final write")
        return None
    assert_never(why)


async def _interrupted_before_training(
    deps: Deps, lease: Lease, why: Interrupt, log: Logger
) -> Outcome | None:
    if why == "cancel":
        await _write_canceling(deps, lease, log)
        return Canceled()
    if why == "release":
        await until_it_lands("release", lambda: deps.store.release(lease))
        log.info("run released before training started")
        return None
    if why == "lost":
        log.warning("lease lost before training started")
        return None
    assert_never(why)


async def _write_canceling(deps: Deps, lease: Lease, log: Logger) -> None:
    try:
        await transient("mark canceling", lambda: deps.store.mark_canceling(lease), within=5.0)
    except (BackendError, BackendUnavailable) as exc:
        # The final `canceled` write is what matters; this intermediate state is best effort.
        log.warning("could not write canceling: {}", exc)


async def _completed(deps: Deps, lease: Lease, job: TrainJob, tracker: ProgressTracker) -> Outcome:
    assert tracker.done is not None
    save_dir = Path(tracker.done.save_dir)
    artifacts = await upload_artifacts(deps.blobs, lease.run_id, save_dir)
    task: Task = job.dataset.task if job.dataset else (job.request.task or "detect")
    best = next((a for a in artifacts if a.name == "best.pt"), None) or next(
        (a for a in artifacts if a.name == "last.pt"), None
    )
    tracker.percent, tracker.eta_seconds = 100.0, 0.0
    results: dict[str, Any] = {
        **summarize(task, tracker.metrics),
        "task": task,
        "progress": tracker.progress(),
        "metrics": tracker.metrics,
        "artifacts": [a.as_json() for a in artifacts],
        "run_dir": str(save_dir),
    }
    return Completed(results=results, trained_model_url=best.url if best else None)


ARTIFACT_FILES = ("weights/best.pt", "weights/last.pt", "results.csv", "args.yaml")
PLOT_SUFFIXES = (".png", ".jpg")


def artifact_key(run_id: str, relative: str) -> str:
    return f"training_runs/{run_id}/{relative}"


def checkpoint_key(run_id: str) -> str:
    return artifact_key(run_id, "checkpoints/last.pt")


def checkpoint_signature_key(run_id: str) -> str:
    return artifact_key(run_id, "checkpoints/last.pt.sig")


async def upload_artifacts(blobs: BlobStore, run_id: str, save_dir: Path) -> list[Artifact]:
    """Weights, results.csv, args.yaml and plots, concurrently, each retried on transient errors."""
    files = await asyncio.to_thread(_artifact_files, save_dir)

    async def one(path: Path) -> Artifact:
        rel = path.relative_to(save_dir).as_posix()
        key = artifact_key(run_id, rel)
        ctype = content_type(path)
        url = await transient(f"upload {rel}", lambda: blobs.upload(key, path, ctype), within=300.0)
        return Artifact(name=path.name, path=key, url=url)

    return list(await asyncio.gather(*(one(p) for p in files)))


def _artifact_files(save_dir: Path) -> list[Path]:
    files = [save_dir / rel for rel in ARTIFACT_FILES if (save_dir / rel).is_file()]
    return files + sorted(p for p in save_dir.glob("*") if p.suffix in PLOT_SUFFIXES and p.is_file())


def content_type(path: Path) -> str:
    if path.suffix in (".pt", ".pth"):
        return "application/octet-stream"
    if path.suffix in (".yaml", ".yml"):
        return "application/x-yaml"
    return mimetypes.guess_type(path.name)[0] or "application/octet-stream"


class _CheckpointUploader:
    """Uploads last.pt at most every checkpoint_interval, in the background, for rescue and resume."""

    def __init__(self, deps: Deps, lease: Lease, log: Logger) -> None:
        self._deps, self._lease, self._log = deps, lease, log
        self._last = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    def maybe_upload(self, path: Path) -> None:
        due = time.monotonic() - self._last >= self._deps.settings.checkpoint_interval
        if not due or (self._task is not None and not self._task.done()) or not path.is_file():
            return
        self._last = time.monotonic()
        self._task = asyncio.create_task(self._upload(path), name=f"checkpoint-{self._lease.run_id}")

    async def _upload(self, path: Path) -> None:
        # Copy first: the trainer rewrites last.pt at every epoch end.
        snapshot = path.with_name("last.upload.pt")
        try:
            await asyncio.to_thread(shutil.copyfile, path, snapshot)
            key = checkpoint_key(self._lease.run_id)
            await transient(
                "checkpoint upload", lambda: self._deps.blobs.upload(key, snapshot, content_type(path))
            )
            secret = self._deps.settings.checkpoint_key
            if secret is not None:
                signature = snapshot.with_name("last.upload.pt.sig")
                text = await asyncio.to_thread(sign_checkpoint, secret, self._lease.run_id, snapshot)
                await asyncio.to_thread(signature.write_text, text)
                sig_key = checkpoint_signature_key(self._lease.run_id)
                await transient(
                    "checkpoint signature upload",
                    lambda: self._deps.blobs.upload(sig_key, signature, "application/json"),
                )
            self._log.bind(key=key).info("checkpoint uploaded")
            self._deps.metrics.checkpoint_uploaded(ok=True)
        except (AgentError, OSError) as exc:
            self._log.warning("checkpoint upload failed: {}", exc)
            self._deps.metrics.checkpoint_uploaded(ok=False)

    async def drain(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def _heartbeat(
    deps: Deps, control: RunControl, progress: tuple[ProgressTracker, asyncio.Event] | None
) -> None:
    """Fenced writes that keep the lease alive and carry progress; what each learns goes to `control`."""
    lease = control.lease
    log = logger.bind(run_id=lease.run_id, worker=lease.worker_id, attempt=lease.attempt)
    schedule = _WriteSchedule(deps.settings, progress)
    while True:
        patch = await schedule.next_write()
        try:
            pulse = await deps.store.touch(lease, patch)
        except (BackendError, BackendUnavailable) as exc:
            # Missing one write is harmless; the next interval tries again, the final write retries.
            log.warning("progress write failed: {}", exc)
            schedule.not_written(patch)
            continue
        schedule.written()
        if not _still_held(control, pulse):
            return


@dataclass
class _WriteSchedule:
    """When the next fenced write is due, and the progress it carries.

    Without a tracker: every heartbeat_interval. With one: at most every progress_interval while
    progress moves, at once on an epoch end, and at least every heartbeat_interval.
    """

    settings: PipelineSettings
    progress: tuple[ProgressTracker, asyncio.Event] | None
    last_write: float = field(default_factory=time.monotonic)

    async def next_write(self) -> dict[str, Any] | None:
        """Wait until a write is due; the results patch it carries, if progress moved."""
        if self.progress is None:
            await asyncio.sleep(self.settings.heartbeat_interval)
            return None
        tracker, wake = self.progress
        while True:
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.progress_interval):
                    await wake.wait()
            wake.clear()
            idle = time.monotonic() - self.last_write
            if not tracker.dirty and idle < self.settings.heartbeat_interval:
                continue
            if not tracker.urgent and idle < self.settings.progress_interval:
                continue
            break
        if not tracker.dirty:
            return None
        tracker.dirty = tracker.urgent = False
        return tracker.results_patch()

    def written(self) -> None:
        self.last_write = time.monotonic()

    def not_written(self, patch: dict[str, Any] | None) -> None:
        if self.progress is not None and patch is not None:
            self.progress[0].dirty = True


def _still_held(control: RunControl, pulse: Pulse | None) -> bool:
    """Act on what a fenced write learned; False once the lease is lost (no write matched)."""
    if pulse is None:
        control.interrupt("lost")
        return False
    if pulse.cancel_requested:
        # Normally the cancel event arrives first; this covers an event that was lost.
        control.interrupt("cancel")
    return True


async def _until_interrupted(control: RunControl, work: Awaitable[T]) -> T:
    """Await `work` unless the run is interrupted first (cancel during a long dataset download)."""
    task = asyncio.ensure_future(work)
    interrupt = asyncio.ensure_future(control.wait_interrupt())
    try:
        await asyncio.wait({task, interrupt}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        interrupt.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    why = control.interrupted()
    assert why is not None
    raise _Interrupted(why)


TRAIN_LOG = "train.log"
CHILD_LOG = "child.log"  # the trainer's stdout and stderr in its workspace (training/parent.py)
_TRAIN_LOG_LINES = 200
_TRAIN_LOG_BYTES = 256 * 1024


async def _crashed(
    deps: Deps, lease: Lease, job: TrainJob, exit_: ChildExit, tracker: ProgressTracker, log: Logger
) -> Failed:
    """The trainer ended without finishing: a short message; its log tail goes to train.log."""
    reason = tracker.error or f"Training process exited with code {exit_.returncode}"
    reason = quote(reason.strip().splitlines()[-1] if reason.strip() else reason)[1:-1]
    source = job.workspace / CHILD_LOG
    target = job.workspace / TRAIN_LOG
    try:
        await asyncio.to_thread(_write_train_log, source, target, exit_.tail)
        key = artifact_key(lease.run_id, TRAIN_LOG)
        url = await transient("upload train.log", lambda: deps.blobs.upload(key, target, "text/plain"))
    except (AgentError, OSError) as exc:
        log.warning("could not store the trainer's log: {}", exc)
        return Failed(f"Training failed: {reason}.")
    artifact = Artifact(name=TRAIN_LOG, path=key, url=url)
    return Failed(
        f"Training failed: {reason}. The trainer's last log lines are in the run's {TRAIN_LOG} artifact.",
        results={"artifacts": [artifact.as_json()]},
    )


def _write_train_log(source: Path, target: Path, tail: tuple[str, ...]) -> None:
    """The last lines of the child's log, redacted, for the web app's users to download."""
    lines: list[str] = list(tail)
    if source.is_file():
        with source.open("rb") as f:
            f.seek(max(0, source.stat().st_size - _TRAIN_LOG_BYTES))
            text = f.read().decode("utf-8", errors="replace").replace("\r", "\n")
        lines = [line for line in text.split("\n") if line.strip()]
    target.write_text("\n".join(redact(line) for line in lines[-_TRAIN_LOG_LINES:]) + "\n")


async def finalize(deps: Deps, lease: Lease, outcome: Outcome, log: Logger) -> None:
    """The final write: retried until it lands, and shielded from the agent's own cancellation."""
    if isinstance(outcome, Failed):
        # The web app shows error_message to its users: short, redacted, no traceback.
        outcome = Failed(error_message(outcome.error_message), outcome.results)
    task = asyncio.ensure_future(until_it_lands("final write", lambda: deps.store.finish(lease, outcome)))
    _final_writes.add(task)
    task.add_done_callback(_final_writes.discard)
    landed = await asyncio.shield(task)
    status = type(outcome).__name__.lower()
    if landed:
        deps.metrics.run_finished(_end_of(outcome))
    if not landed:
        log.bind(outcome=status).warning("final write matched no row: the lease was lost")
    elif isinstance(outcome, Failed):
        log.bind(outcome=status).warning("run failed: {}", (outcome.error_message.splitlines() or [""])[0])
    elif isinstance(outcome, Completed):
        r = outcome.results
        log.bind(
            outcome=status,
            **{"mAP50-95": _rounded(r.get("mAP")), "mAP50": _rounded(r.get("mAP50"))},
            model=outcome.trained_model_url,
        ).info("run finished")
    else:
        log.bind(outcome=status).info("run finished")


def _rounded(value: object) -> object:
    return round(value, 4) if isinstance(value, float) else value


def _end_of(outcome: Outcome) -> RunEnd:
    if isinstance(outcome, Completed):
        return "completed"
    if isinstance(outcome, Failed):
        return "failed"
    if isinstance(outcome, Canceled):
        return "canceled"
    assert_never(outcome)


_final_writes: set[asyncio.Future[bool]] = set()


async def drain_final_writes() -> None:
    """Let final writes still in flight land before the store closes."""
    if _final_writes:
        await asyncio.wait(set(_final_writes))
