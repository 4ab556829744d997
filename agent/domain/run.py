"""The run as the agent sees it: row image, lease (fencing token), hints and outcomes."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
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


HintOp = Literal["INSERT", "UPDATE", "DELETE", "POLL"]


@dataclass(frozen=True, slots=True)
class Hint:
    """'Look at run X': from an event or a poll. Events are hints; the store is the truth."""

    run_id: str
    op: HintOp
    claimable: bool
    cancel_requested: bool = False
    worker_id: str | None = None
    status: RunStatus | None = None


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
    worker_id: str
    host: str
    version: str
    gpus: tuple[str, ...] = ()
    slots: int = 1


@dataclass(frozen=True, slots=True)
class WorkerState:
    status: WorkerStatus
    current_runs: tuple[str, ...] = ()


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
    run_name: str | None = None
    project_id: str | None = None
    step_id: str | None = None
