"""Run workspaces are removed once their run is over; a few failed ones may be kept to look into.

A resumed attempt starts from the checkpoint in the artifact store, never from a workspace, so
nothing needs a workspace after its run's final write. With `keep_failed` a failed attempt's
workspace stays, marked with KEPT_MARKER, and only the newest `max_kept` marked ones are kept.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loguru import Logger

KEPT_MARKER = ".kept"


@dataclass(frozen=True, slots=True)
class WorkspacePolicy:
    keep_failed: bool
    max_kept: int


def clean_workspaces(
    runs_root: Path, run_id: str, attempt: int, failed: bool, policy: WorkspacePolicy, log: Logger
) -> None:
    """Remove the run's workspaces (blocking I/O: call it in a thread)."""
    run_dir = runs_root / run_id
    current = run_dir / f"attempt-{attempt}"
    keep = failed and policy.keep_failed and policy.max_kept > 0 and current.is_dir()
    if keep:
        (current / KEPT_MARKER).write_text(f"{time.time()}\n", encoding="utf-8")
        log.bind(workspace=str(current)).info("failed run's workspace kept")
    if run_dir.is_dir() and not run_dir.is_symlink():
        for child in run_dir.iterdir():
            # Earlier attempts of this run on this host are no use either, unless kept themselves.
            if (child == current and keep) or (child / KEPT_MARKER).is_file():
                continue
            _remove(child)
        if not any(run_dir.iterdir()):
            run_dir.rmdir()
    if keep:
        _prune_kept(runs_root, policy.max_kept, log)


def _prune_kept(runs_root: Path, max_kept: int, log: Logger) -> None:
    kept = sorted(runs_root.glob(f"*/attempt-*/{KEPT_MARKER}"), key=_mtime, reverse=True)
    for marker in kept[max_kept:]:
        workspace = marker.parent
        _remove(workspace)
        if workspace.parent.is_dir() and not any(workspace.parent.iterdir()):
            workspace.parent.rmdir()
        log.bind(workspace=str(workspace)).info("oldest kept workspace removed")


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
        return
    shutil.rmtree(path, ignore_errors=True)
