"""The row as the web app's TrainingStatus page reads it, with JavaScript's number semantics."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

_MISSING = object()  # JavaScript's `undefined`: a key that is not there


def js_number(value: object) -> float:
    """JavaScript's Number(value): null is 0, undefined and non-numeric text are NaN."""
    if value is None:
        return 0.0
    if value is _MISSING or isinstance(value, (dict, list)):
        return math.nan
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return 0.0
        try:
            return float(text)
        except ValueError:
            return math.nan
    return math.nan


def to_number(value: object) -> float | None:
    """TrainingStatus.jsx's toNumber: Number(value) when finite, else null."""
    number = js_number(value)
    return number if math.isfinite(number) else None


@dataclass(frozen=True)
class AppView:
    progress: float  # the progress bar, 0..100
    label: str  # the label next to it
    is_training: bool
    has_results: bool
    epoch_display: int


def app_view(row: dict[str, Any]) -> AppView:
    """TrainingStatus.jsx: the progress bar, its label, and whether the results card shows."""
    status = row["status"]
    is_training = status in ("running", "canceling")
    is_completed = status == "completed"
    results = row.get("results") or {}
    raw_metrics = results.get("metrics") or {}
    configuration = row.get("configuration") or {}
    total = configuration.get("epochs") or 0
    metric_epoch = to_number(raw_metrics.get("epoch", _MISSING))
    current = metric_epoch if metric_epoch is not None else (total if is_completed else 0)
    idle = 100.0 if is_completed else 0.0
    progress = min(100.0, current / total * 100) if total and current else idle
    labels = {
        "completed": "100%",
        "canceling": "Canceling",
        "running": "Running",
        "queued": "Queued",
        "failed": "Failed",
        "canceled": "Canceled",
        "stopped": "Stopped",
    }
    artifacts = results.get("artifacts")
    artifacts = artifacts if isinstance(artifacts, list) else []
    has_results = is_completed and (
        to_number(results.get("mAP", _MISSING)) is not None
        or to_number(results.get("precision", _MISSING)) is not None
        or to_number(results.get("recall", _MISSING)) is not None
        or len(artifacts) > 0
    )
    return AppView(
        progress=progress,
        label=labels.get(status, "0%"),
        is_training=is_training,
        has_results=has_results,
        epoch_display=max(0, math.floor(current or 0)),
    )
