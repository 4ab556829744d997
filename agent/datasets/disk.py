"""Free disk space: a run that would fill the disk fails before it starts writing, with a clear message."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from agent.domain.errors import DatasetError

GB = 1024**3


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds `path` (or its nearest existing parent)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


@dataclass(frozen=True, slots=True)
class DiskSpace:
    """MIN_FREE_DISK_GB: what must stay free after a download, and before training starts."""

    min_free: int = 2 * GB

    def short(self, folder: Path, needed: int = 0) -> bool:
        return free_bytes(folder) - needed < self.min_free

    def check(self, folder: Path, needed: int, what: str) -> None:
        free = free_bytes(folder)
        if free - needed >= self.min_free:
            return
        need = f", {needed / GB:.2f} GB needed" if needed else ""
        raise DatasetError(
            f"not enough free disk space {what}: {free / GB:.2f} GB free{need}, and "
            f"{self.min_free / GB:g} GB must stay free (MIN_FREE_DISK_GB)"
        )
