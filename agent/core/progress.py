"""Turns trainer messages into the row's `results.progress` and `results.metrics`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, assert_never

from agent.domain.messages import BatchProgress, Done, EpochEnd, Error, Started, Stopped, TrainerMessage


def hhmmss(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    total = max(0, round(seconds))
    return f"{total // 3600:02d}:{total % 3600 // 60:02d}:{total % 60:02d}"


@dataclass
class ProgressTracker:
    """Latest known state of one training; `dirty` says the row is behind."""

    total_epochs: int
    epoch: int = 0
    batch: int = 0
    batches: int = 0
    percent: float = 0.0
    eta_seconds: float | None = None
    losses: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    epochs_done: int = 0
    checkpoint: str | None = None
    done: Done | None = None
    error: str | None = None
    stopped: bool = False
    device: str | None = None
    dirty: bool = False
    urgent: bool = False  # an epoch ended: write now, not at the next interval
    updated_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None  # when the trainer reported its start (monotonic)

    def update(self, msg: TrainerMessage) -> None:
        self.updated_at = time.monotonic()
        if isinstance(msg, Started):
            self.started_at = self.updated_at
            self.total_epochs = msg.total_epochs
            self.device = msg.device
            self.epochs_done = max(self.epochs_done, msg.start_epoch - 1)
            self.epoch = msg.start_epoch
            self.percent = 100.0 * self.epochs_done / max(1, self.total_epochs)
            self.dirty = self.urgent = True
        elif isinstance(msg, BatchProgress):
            self.total_epochs = msg.total_epochs
            self.epoch, self.batch, self.batches = msg.epoch, msg.batch, msg.batches
            frac = (msg.epoch - 1 + msg.batch / max(1, msg.batches)) / max(1, msg.total_epochs)
            self.percent = min(100.0, 100.0 * frac)
            self.eta_seconds = msg.eta_seconds
            self.losses = dict(msg.losses)
            self.dirty = True
        elif isinstance(msg, EpochEnd):
            self.total_epochs = msg.total_epochs
            self.epoch = self.epochs_done = msg.epoch
            self.batch = self.batches
            self.percent = min(100.0, 100.0 * msg.epoch / max(1, msg.total_epochs))
            self.eta_seconds = msg.eta_seconds
            self.metrics = self._row(msg.metrics, msg.epoch)
            self.checkpoint = msg.checkpoint or self.checkpoint
            self.dirty = self.urgent = True
        elif isinstance(msg, Done):
            self.done = msg
            # A finished training is all of its epochs for the app's progress bar, also when
            # early stopping (patience) ended it before the last one.
            self.epoch = self.epochs_done = max(self.epochs_done, self.total_epochs)
            self.percent = 100.0
            self.eta_seconds = 0.0
            self.metrics = self._row({**self.metrics, **msg.metrics}, self.epoch)
            self.dirty = self.urgent = True
        elif isinstance(msg, Stopped):
            self.stopped = True
        elif isinstance(msg, Error):
            self.error = msg.message
        else:
            assert_never(msg)

    def _row(self, metrics: dict[str, float], epoch: int) -> dict[str, float]:
        """The metrics row plus `epoch` (epochs done) and `time` (seconds), as the old script wrote it."""
        # The web app draws its progress bar as metrics.epoch / configuration.epochs.
        start = self.started_at if self.started_at is not None else self.updated_at
        return {**metrics, "epoch": epoch, "time": round(self.updated_at - start, 3)}

    def progress(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "total_epochs": self.total_epochs,
            "percent": round(self.percent, 2),
            "eta_seconds": None if self.eta_seconds is None else round(self.eta_seconds, 1),
            "eta": hhmmss(self.eta_seconds),
            "batch": self.batch,
            "batches": self.batches,
            "losses": self.losses,
        }

    def results_patch(self) -> dict[str, Any]:
        patch: dict[str, Any] = {"progress": self.progress()}
        if self.metrics:
            patch["metrics"] = self.metrics
        return patch
