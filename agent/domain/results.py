"""The final `results` summary, keyed as the old script wrote it."""

from __future__ import annotations

from collections.abc import Mapping

from agent.domain.request import Task


def _pick(metrics: Mapping[str, float], *keys: str) -> float | None:
    for key in keys:
        value = metrics.get(key)
        if isinstance(value, (int, float)):
            return float(value)
    return None


def summarize(task: Task, metrics: Mapping[str, float]) -> dict[str, float | None]:
    """mAP (mAP50-95, else mAP50), precision, recall; mask metrics for segment, box otherwise."""
    suffixes = ("(M)", "(B)") if task == "segment" else ("(B)",)
    out: dict[str, float | None] = {"mAP": None, "mAP50": None, "precision": None, "recall": None}
    for s in suffixes:
        if out["mAP"] is None:
            out["mAP"] = _pick(metrics, f"metrics/mAP50-95{s}", f"metrics/mAP50{s}")
        if out["mAP50"] is None:
            out["mAP50"] = _pick(metrics, f"metrics/mAP50{s}")
        if out["precision"] is None:
            out["precision"] = _pick(metrics, f"metrics/precision{s}")
        if out["recall"] is None:
            out["recall"] = _pick(metrics, f"metrics/recall{s}")
    return out
