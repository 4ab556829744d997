"""An in-process BlobStore: objects in a dict, URLs under `memory://`."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from agent.domain.errors import BackendError, BackendUnavailable


@dataclass(frozen=True, slots=True)
class StoredBlob:
    data: bytes
    content_type: str


class MemoryBlobs:
    """Uploads overwrite; `fail_next` makes the next calls raise, like a flaky storage server."""

    def __init__(self, base_url: str = "memory://artifacts") -> None:
        self.base_url = base_url.rstrip("/")
        self.objects: dict[str, StoredBlob] = {}
        self._failures: list[tuple[Exception, frozenset[str] | None]] = []

    def url(self, key: str) -> str:
        return f"{self.base_url}/{key.lstrip('/')}"

    @staticmethod
    def _check(key: str) -> str:
        # Same rule as the real stores: a key never leaves the artifacts root.
        parts = PurePosixPath(key).parts
        if not parts or key.startswith("/") or ".." in parts:
            raise BackendError(f"invalid artifact key: {key!r}")
        return key

    def fail_next(
        self, error: Exception | None = None, times: int = 1, ops: Iterable[str] | None = None
    ) -> None:
        scope = frozenset(ops) if ops is not None else None
        self._failures.extend([(error or BackendUnavailable("injected storage failure"), scope)] * times)

    async def _io(self, op: str) -> None:
        await asyncio.sleep(0)
        for i, (error, scope) in enumerate(self._failures):
            if scope is None or op in scope:
                del self._failures[i]
                raise error

    async def upload(self, key: str, source: Path, content_type: str) -> str:
        self._check(key)
        await self._io("upload")
        data = await asyncio.to_thread(source.read_bytes)
        self.objects[key] = StoredBlob(data, content_type)
        return self.url(key)

    async def download(self, key: str, dest: Path) -> bool:
        self._check(key)
        await self._io("download")
        blob = self.objects.get(key)
        if blob is None:
            return False
        dest.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(dest.write_bytes, blob.data)
        return True
