"""Messages from the child trainer to the parent, and their JSON-lines codec."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, assert_never


@dataclass(frozen=True, slots=True)
class Started:
    total_epochs: int
    start_epoch: int = 1
    device: str = "cpu"
    note: str = ""


@dataclass(frozen=True, slots=True)
class BatchProgress:
    epoch: int  # 1-based
    total_epochs: int
    batch: int  # 1-based within the epoch
    batches: int
    losses: dict[str, float] = field(default_factory=dict)
    eta_seconds: float | None = None


@dataclass(frozen=True, slots=True)
class EpochEnd:
    epoch: int
    total_epochs: int
    metrics: dict[str, float] = field(default_factory=dict)
    eta_seconds: float | None = None
    checkpoint: str | None = None  # path of last.pt after this epoch, when one was saved


@dataclass(frozen=True, slots=True)
class Done:
    save_dir: str
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Stopped:
    """The child honoured a stop request."""

    epoch: int | None = None  # the last completed epoch, whose checkpoint can be resumed


@dataclass(frozen=True, slots=True)
class Error:
    message: str


TrainerMessage = Started | BatchProgress | EpochEnd | Done | Stopped | Error

_TYPES: dict[str, type[TrainerMessage]] = {
    "started": Started,
    "batch": BatchProgress,
    "epoch": EpochEnd,
    "done": Done,
    "stopped": Stopped,
    "error": Error,
}


def _type_name(msg: TrainerMessage) -> str:
    if isinstance(msg, Started):
        return "started"
    if isinstance(msg, BatchProgress):
        return "batch"
    if isinstance(msg, EpochEnd):
        return "epoch"
    if isinstance(msg, Done):
        return "done"
    if isinstance(msg, Stopped):
        return "stopped"
    if isinstance(msg, Error):
        return "error"
    assert_never(msg)


def encode(msg: TrainerMessage) -> bytes:
    payload: dict[str, Any] = {"type": _type_name(msg), **asdict(msg)}
    return (json.dumps(payload, separators=(",", ":"), default=str) + "\n").encode()


def decode(line: bytes | str) -> TrainerMessage:
    """Parse one line; raises ValueError on anything that is not a known message."""
    data = json.loads(line)
    if not isinstance(data, dict):
        raise ValueError("trainer message is not an object")
    cls = _TYPES.get(str(data.pop("type", "")))
    if cls is None:
        raise ValueError(f"unknown trainer message: {line!r}")
    return cls(**data)
