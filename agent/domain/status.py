"""Run and worker statuses as the web app reads them."""

from __future__ import annotations

from enum import StrEnum


class RunStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    CANCELING = "canceling"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELED})

# The old script selected these statuses as claimable; kept so rows it wrote stay claimable.
CLAIMABLE_STATUSES = frozenset({RunStatus.QUEUED, RunStatus.RUNNING})


class WorkerStatus(StrEnum):
    ONLINE = "online"
    BUSY = "busy"
    OFFLINE = "offline"


def is_claimable(
    status: str | None, started_at: object, worker_id: str | None, cancel_requested: bool | None
) -> bool:
    """The claimable predicate of the row contract, evaluated on a row image."""
    return (
        status in {s.value for s in CLAIMABLE_STATUSES}
        and started_at is None
        and worker_id is None
        and cancel_requested is not True
    )
