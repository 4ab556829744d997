"""The run as the agent sees it: row image, lease (fencing token), hints and outcomes."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from agent.domain.status import RunStatus, WorkerStatus

JsonDict = dict[str, Any]


def json_safe(value: Any) -> Any:
    """`value` with non-finite floats as null: JSON has no NaN, and a NaN loss must not fail a run."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


@dataclass(frozen=True, slots=True)
class RunRow:
    """One `training_runs` row, as read from the store."""

    id: str
    status: RunStatus
    data_yaml: str | None = None
    base_model: str | None = None
    # Raw as stored: a JSON object, a JSON string, or anything a client wrote; parsed in request.py.
    configuration: object = None
    cancel_requested: bool = False
    worker_id: str | None = None
    attempt: int = 0
    created_at: datetime | None = None
    started_at: datetime | None = None
    heartbeat_at: datetime | None = None
    completed_at: datetime | None = None
    canceled_at: datetime | None = None
    error_message: str | None = None
    trained_model_url: str | None = None
    results: JsonDict | None = None


@dataclass(frozen=True, slots=True)
class Lease:
    """Ownership of a claimed run; every later write is conditioned on it."""

    run_id: str
    worker_id: str
    attempt: int


@dataclass(frozen=True, slots=True)
class Claimed:
    lease: Lease
    row: RunRow


# CHECK: the stream may have missed changes of a run this agent holds (its own feed was not up
# yet): read the row.
HintOp = Literal["INSERT", "UPDATE", "DELETE", "POLL", "CHECK"]


@dataclass(frozen=True, slots=True)
class Hint:
    """'Look at run X': from an event or a poll. Events are hints; the store is the truth."""

    run_id: str
    op: HintOp
    claimable: bool
    cancel_requested: bool = False
    worker_id: str | None = None
    status: RunStatus | None = None
    # The status as the event carried it, also one the agent does not know (the app's `stopped`).
    raw_status: str | None = None
    # The row's fencing token when the event carried it: tells an old event from a new claim's.
    attempt: int | None = None
    # The whole row, when an INSERT event carried it: spares the read before a claim.
    image: RunRow | None = None

    @property
    def unknown_status(self) -> bool:
        return self.status is None and self.raw_status is not None


@dataclass(frozen=True, slots=True)
class PollResult:
    claimable: tuple[str, ...] = ()
    # Unclaimed runs whose cancel button was pressed: marked canceled by whoever sees them.
    cancel_unclaimed: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Pulse:
    """What a fenced heartbeat/progress write learned about the run."""

    cancel_requested: bool


@dataclass(frozen=True, slots=True)
class RescueReport:
    requeued: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()
    offline_workers: tuple[str, ...] = ()  # registry rows of dead workers set offline


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """This agent in `trainer_workers`; the web app shows the hardware fields in its worker popover."""

    worker_id: str
    host: str
    version: str
    gpus: tuple[str, ...] = ()  # names of the GPUs this agent trains on, one per device
    slots: int = 1
    gpu_memory_gb: float | None = None  # of the first GPU
    cpu_model: str | None = None
    ram_gb: float | None = None

    @property
    def device_type(self) -> Literal["gpu", "cpu"]:
        """As the app's compute choice names it."""
        return "gpu" if self.gpus else "cpu"

    @property
    def compute_type(self) -> Literal["cuda", "cpu"]:
        return "cuda" if self.gpus else "cpu"

    @property
    def gpu_name(self) -> str | None:
        """`NVIDIA H200`, or `2x NVIDIA H200` / a list for a host with several."""
        if not self.gpus:
            return None
        if len(set(self.gpus)) == 1:
            return self.gpus[0] if len(self.gpus) == 1 else f"{len(self.gpus)}x {self.gpus[0]}"
        return ", ".join(self.gpus)


@dataclass(frozen=True, slots=True)
class WorkerState:
    status: WorkerStatus
    current_runs: tuple[str, ...] = ()
    free_slots: int | None = None


@dataclass(frozen=True, slots=True)
class Artifact:
    name: str
    path: str
    url: str

    def as_json(self) -> JsonDict:
        return {"name": self.name, "path": self.path, "url": self.url}


@dataclass(frozen=True, slots=True)
class Completed:
    results: JsonDict
    trained_model_url: str | None


@dataclass(frozen=True, slots=True)
class Failed:
    error_message: str
    results: JsonDict = field(default_factory=dict)


CANCELED_MESSAGE = "Canceled by user."


@dataclass(frozen=True, slots=True)
class Canceled:
    error_message: str = CANCELED_MESSAGE


Outcome = Completed | Failed | Canceled


@dataclass(frozen=True, slots=True)
class NewRun:
    """A run request as the web app (or `saturnos-agent submit`) inserts it."""

    data_yaml: str | None
    base_model: str | None = None
    configuration: JsonDict = field(default_factory=dict)
    # The app's schema requires a name; project and step link the run to the app's pages.
    run_name: str | None = None
    project_id: str | None = None
    step_id: str | None = None

    def name_at(self, now: datetime) -> str:
        """`run_name`, or one made from the dataset's name and the time, like `bolts_20260102-0304`."""
        if self.run_name and self.run_name.strip():
            return self.run_name.strip()
        return f"{dataset_name(self.data_yaml)}_{now.strftime('%Y%m%d-%H%M%S')}"


_GENERIC_YAML = frozenset({"data", "dataset", "data.yaml", "dataset.yaml"})


def dataset_name(data_yaml: str | None) -> str:
    """A short name for a dataset reference: the file's stem, or its folder's for a `data.yaml`."""
    parts = [p for p in re.split(r"[/\\]", (data_yaml or "").split("?", 1)[0]) if p]
    stem = parts[-1].rsplit(".", 1)[0] if parts else ""
    if stem.lower() in _GENERIC_YAML and len(parts) >= 2:
        stem = parts[-2]
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem.removeprefix("storage:")).strip("_.")[:40]
    return stem or "run"


def new_run_columns(run: NewRun, now: datetime | None = None) -> dict[str, str | None]:
    """The columns a submit writes besides the request: name, project and step."""
    return {
        "run_name": run.name_at(now or datetime.now(UTC)),
        "project_id": run.project_id or None,
        "step_id": run.step_id or None,
    }


def hardware_columns(worker: WorkerInfo) -> dict[str, str | float | None]:
    """The `trainer_workers` columns the web app's hardware popover reads."""
    return {
        "device_type": worker.device_type,
        "compute_type": worker.compute_type,
        "gpu_name": worker.gpu_name,
        "gpu_memory_gb": worker.gpu_memory_gb,
        "cpu_model": worker.cpu_model,
        "ram_gb": worker.ram_gb,
    }
