"""Artifacts in a local folder, laid out as in the artifacts bucket; URLs are file:// URLs."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path, PurePosixPath

from agent.domain.errors import BackendError


class LocalBlobs:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def _path(self, key: str) -> Path:
        rel = PurePosixPath(key)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise BackendError(f"invalid artifact key: {key!r}")
        return self.root.joinpath(*rel.parts)

    async def upload(self, key: str, source: Path, content_type: str) -> str:
        dest = self._path(key)

        def copy() -> None:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
            shutil.copyfile(source, tmp)
            os.replace(tmp, dest)

        try:
            await asyncio.to_thread(copy)
        except OSError as exc:
            raise BackendError(f"cannot store artifact {key}: {exc}") from exc
        return dest.as_uri()

    async def download(self, key: str, dest: Path) -> bool:
        src = self._path(key)
        if not src.is_file():
            return False

        def copy() -> None:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)

        try:
            await asyncio.to_thread(copy)
        except OSError as exc:
            raise BackendError(f"cannot read artifact {key}: {exc}") from exc
        return True
