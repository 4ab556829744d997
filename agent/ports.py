"""Small async Protocols between the core and its backends.

Adapters raise only agent.domain.errors types: BackendUnavailable for transient failures
(the core retries those), BackendError for permanent ones.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from agent.domain.messages import TrainerMessage
from agent.domain.request import Task, TrainingRequest
from agent.domain.run import (
    Claimed,
    Hint,
    Lease,
    NewRun,
    Outcome,
    PollResult,
    Pulse,
    RescueReport,
    RunRow,
    WorkerInfo,
    WorkerState,
)

HintSink = Callable[[Hint], None]
"""Non-blocking and never raises: event callbacks only enqueue."""


class RunStore(Protocol):
    """The agent's side of `training_runs` and `trainer_workers`."""

    async def poll(self, limit: int) -> PollResult:
        """Claimable runs, oldest first, and unclaimed runs with a cancel request."""
        ...

    async def claim(self, run_id: str, worker_id: str) -> Claimed | None:
        """Conditional claim; None when the run is not claimable (someone else won)."""
        ...

    async def get(self, run_id: str) -> RunRow | None: ...

    async def touch(self, lease: Lease, results: Mapping[str, Any] | None = None) -> Pulse | None:
        """Fenced heartbeat, merging `results` keys into the row; None when the lease is lost."""
        ...

    async def mark_canceling(self, lease: Lease) -> bool: ...

    async def finish(self, lease: Lease, outcome: Outcome) -> bool:
        """Fenced final write; False when the lease is lost."""
        ...

    async def release(self, lease: Lease) -> bool:
        """Put an owned run back to claimable (graceful shutdown)."""
        ...

    async def cancel_unclaimed(self, run_id: str) -> bool:
        """Mark an unclaimed, cancel-requested run canceled; False if it was claimed meanwhile."""
        ...

    async def rescue_stale(self, stale_after_s: float, max_attempts: int) -> RescueReport: ...

    async def register_worker(self, worker: WorkerInfo, state: WorkerState) -> None: ...

    async def largest_worker(self) -> int:
        """The most GPUs one registered worker can give a single run (0 when none has a GPU)."""
        ...


class RunAdmin(Protocol):
    """The web app's side, used by the CLI (submit, cancel, list, watch)."""

    async def submit(self, run: NewRun) -> str: ...

    async def request_cancel(self, run_id: str) -> bool: ...

    async def list_runs(self, limit: int = 20) -> list[RunRow]: ...

    async def get(self, run_id: str) -> RunRow | None: ...


class RunEvents(Protocol):
    """A hint stream of INSERT/UPDATE changes on `training_runs`."""

    @property
    def healthy(self) -> bool:
        """True while subscribed; the core polls faster while it is False."""
        ...

    async def listen(self, sink: HintSink, on_subscribed: Callable[[], None]) -> None:
        """Stream hints until cancelled, reconnecting by itself.

        Calls `on_subscribed` after every (re)subscription so the core runs a catch-up poll.
        """
        ...

    def follow(self, run_ids: frozenset[str]) -> None:
        """The runs this agent holds now: every change of each must reach it, a takeover included.

        A stream that hears every change has nothing to do. One that subscribes per run sends a
        `CHECK` hint for a run whenever its feed (re)starts, since changes before that were missed.
        """
        ...


class BlobStore(Protocol):
    """Artifact storage (Supabase Storage or a local folder)."""

    async def upload(self, key: str, source: Path, content_type: str) -> str:
        """Upload (overwriting) and return the URL the web app should use."""
        ...

    async def download(self, key: str, dest: Path) -> bool:
        """Download to `dest`; False when the object does not exist."""
        ...


@dataclass(frozen=True, slots=True)
class PreparedDataset:
    yaml_path: Path  # the workspace copy, its `path:` pointing into the workspace
    task: Task  # requested, else inferred from the labels
    summary: Mapping[str, int]  # counts for logs: images, labels, dropped lines, …


class Datasets(Protocol):
    async def prepare(self, request: TrainingRequest, run_id: str, workspace: Path) -> PreparedDataset:
        """Resolve and normalize the dataset into `workspace`; raises DatasetError."""
        ...


@dataclass(frozen=True, slots=True)
class TrainJob:
    run_id: str
    attempt: int
    request: TrainingRequest
    workspace: Path  # the run's folder; the trainer writes under workspace / "train"
    dataset: PreparedDataset | None  # None for the fake trainer
    model: str  # resolved weights path or model yaml, ready for YOLO(...)
    resume_from: Path | None = None
    # The devices this run holds, as CUDA_VISIBLE_DEVICES pins them for the child (None: not pinned;
    # "": no GPU at all); request.device is already rewritten to the child's view of them.
    visible_devices: str | None = None


@dataclass(frozen=True, slots=True)
class ChildExit:
    returncode: int
    stopped: bool  # it exited after a stop request
    tail: tuple[str, ...]  # last lines of its stdout/stderr


class TrainingProcess(Protocol):
    @property
    def pid(self) -> int: ...

    def messages(self) -> AsyncIterator[TrainerMessage]:
        """Messages until the child closes its pipe (exit or crash)."""
        ...

    async def stop(self, reason: str) -> ChildExit:
        """Stop message, then SIGTERM, then SIGKILL of the group; returns once it is all gone."""
        ...

    async def wait(self) -> ChildExit:
        """Wait for exit and reap the whole process group."""
        ...


class Trainer(Protocol):
    async def start(self, job: TrainJob) -> TrainingProcess: ...


RunEnd = Literal["completed", "failed", "canceled"]


class Metrics(Protocol):
    """What the core counts for operators; an adapter exports it (Prometheus), or nothing does."""

    def run_claimed(self, pickup_seconds: float | None) -> None:
        """A claim won; `pickup_seconds` from the row's created_at, when known."""
        ...

    def claim_conflict(self) -> None:
        """A claim lost to another worker (or the run stopped being claimable)."""
        ...

    def run_finished(self, outcome: RunEnd) -> None: ...

    def cancel_stopped(self, seconds: float) -> None:
        """From hearing a cancel to the trainer's whole process group being gone."""
        ...

    def stream_subscribed(self, first: bool) -> None:
        """The event stream (re)subscribed; `first` is False for every reconnect."""
        ...

    def catch_up(self, missed: int) -> None:
        """A catch-up poll ran; `missed` claimable runs in it had come with no event."""
        ...

    def checkpoint_uploaded(self, ok: bool) -> None: ...


class NoMetrics:
    """Metrics off: every count is dropped."""

    def run_claimed(self, pickup_seconds: float | None) -> None:
        pass

    def claim_conflict(self) -> None:
        pass

    def run_finished(self, outcome: RunEnd) -> None:
        pass

    def cancel_stopped(self, seconds: float) -> None:
        pass

    def stream_subscribed(self, first: bool) -> None:
        pass

    def catch_up(self, missed: int) -> None:
        pass

    def checkpoint_uploaded(self, ok: bool) -> None:
        pass


@dataclass(frozen=True, slots=True)
class Health:
    """What /healthz and /readyz answer from."""

    alive: bool  # the agent loop is serving (not yet stopped)
    database: bool  # the last poll or registry write reached the database
    stream: bool  # the event stream is subscribed
    polling: bool  # the last poll succeeded (the agent works without events, just slower)
    slots_busy: int
    slots_total: int

    @property
    def ready(self) -> bool:
        return self.alive and self.database and (self.stream or self.polling)
