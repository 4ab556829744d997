"""Datasets in Supabase Storage: a RemoteSource for `storage:bucket/path` URIs and Storage URLs.

Objects are listed and fetched with the service-role key through storage3, whatever the URL kind
(public, signed, authenticated): the key reads every bucket of the project, and a signed URL's
token covers the YAML alone, not the folder the dataset lies in. The YAML of a signed URL is
fetched with its own token, so a URL the app signed keeps working even if the key's policies
change. Retries, size checks and caching are the preparer's (agent.datasets.cache.Fetcher).
"""

from __future__ import annotations

import asyncio
import posixpath
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from storage3 import AsyncStorageClient

from agent.backends.supabase.transport import TRANSLATED, translate
from agent.datasets.refs import HttpRef, StorageRef
from agent.datasets.remote import (
    RemoteError,
    RemoteFile,
    RemoteNotFound,
    RemoteSource,
    RemoteTransient,
    SourceFactory,
)
from agent.domain.errors import BackendUnavailable, DatasetError, NotFound

PAGE_SIZE = 1000
# Bodies up to this size are written on the event loop: a thread hand-off costs more than the write.
_INLINE_WRITE = 256 * 1024
_MAX_DEPTH = 32
# The dashboard's marker object for an empty folder: not part of any dataset.
_PLACEHOLDER = ".emptyFolderPlaceholder"


def origin_of(url: str) -> str:
    """scheme://host[:port][/prefix], lower-cased, no trailing slash: how refs.py names a project."""
    parts = urlsplit(url.strip())
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}{parts.path.rstrip('/')}"


def _remote_error(exc: BaseException, what: str) -> RemoteError:
    error = translate(exc, what)
    if isinstance(error, NotFound):
        return RemoteNotFound(str(error))
    if isinstance(error, BackendUnavailable):
        return RemoteTransient(str(error), getattr(exc, "retry_after", None))
    return RemoteError(str(error))


def _write(dest: Path, data: bytes) -> int:
    dest.write_bytes(data)
    return len(data)


async def _save(dest: Path, data: bytes) -> int:
    if len(data) <= _INLINE_WRITE:
        return _write(dest, data)
    return await asyncio.to_thread(_write, dest, data)


class StorageSource:
    """One dataset folder in one bucket: the YAML's folder, listed recursively and fetched by path."""

    def __init__(
        self,
        ref: StorageRef,
        storage: AsyncStorageClient,
        http: httpx.AsyncClient,
        project_origin: str,
        *,
        page_size: int = PAGE_SIZE,
    ) -> None:
        self._ref = ref
        self._storage = storage
        self._http = http
        self._origin = project_origin
        self._page_size = page_size

    @property
    def cache_key(self) -> str:
        # One key for the object whichever way it was named (URI, public, signed or authenticated URL).
        return f"storage:{self._origin}/{self._ref.bucket}/{self._ref.path}"

    def _object(self, path: str) -> str:
        clean = path.strip("/")
        return posixpath.join(self._ref.folder, clean) if self._ref.folder else clean

    def describe(self, path: str) -> str:
        return f"storage:{self._ref.bucket}/{self._object(path)}"

    async def aclose(self) -> None:
        """Nothing to release: the clients belong to the backend, shared by every source."""

    async def list_files(self, prefix: str) -> list[RemoteFile]:
        found: list[RemoteFile] = []
        root = prefix.strip("/")

        async def walk(folder: str, depth: int) -> None:
            if depth > _MAX_DEPTH:
                return
            subfolders: list[str] = []
            for name, is_folder, size in await self._list_folder(folder):
                rel = f"{folder}/{name}" if folder else name
                if is_folder:
                    subfolders.append(rel)
                else:
                    found.append(RemoteFile(rel, size))
            await asyncio.gather(*(walk(sub, depth + 1) for sub in subfolders))

        await walk(root, 0)
        return sorted(found, key=lambda f: f.path)

    async def _list_folder(self, folder: str) -> list[tuple[str, bool, int | None]]:
        """Every entry of one folder, page by page; folders come back with a null id."""
        bucket = self._storage.from_(self._ref.bucket)
        path = self._object(folder)
        entries: list[tuple[str, bool, int | None]] = []
        offset = 0
        while True:
            try:
                page = await bucket.list(
                    path,
                    {
                        "limit": self._page_size,
                        "offset": offset,
                        "sortBy": {"column": "name", "order": "asc"},
                    },
                )
            except TRANSLATED as exc:
                raise _remote_error(exc, f"list {self.describe(folder)}/") from exc
            if not isinstance(page, list):
                raise RemoteError(f"list {self.describe(folder)}/: unexpected answer {type(page).__name__}")
            for entry in page:
                parsed = _entry(entry)
                if parsed is not None:
                    entries.append(parsed)
            if len(page) < self._page_size:
                return entries
            offset += len(page)

    async def fetch(self, path: str, dest: Path) -> int:
        what = f"download {self.describe(path)}"
        ref = self._ref
        if ref.url_kind == "sign" and ref.url and path == ref.yaml_name:
            fetched = await self._fetch_signed(ref.url, dest, what)
            if fetched is not None:
                return fetched
        try:
            data = await self._storage.from_(ref.bucket).download(self._object(path))
        except TRANSLATED as exc:
            raise _remote_error(exc, what) from exc
        return await _save(dest, data)

    async def _fetch_signed(self, url: str, dest: Path, what: str) -> int | None:
        """The object through its signed URL; None when the token is refused (expired): use the key."""
        try:
            response = await self._http.get(url)
        except TRANSLATED as exc:
            raise _remote_error(exc, what) from exc
        if response.status_code == 200:
            return await _save(dest, response.content)
        if response.status_code in (404, 410) or "not_found" in response.text or "not found" in response.text:
            raise RemoteNotFound(f"{what}: HTTP {response.status_code}")
        return None


def _entry(entry: object) -> tuple[str, bool, int | None] | None:
    if not isinstance(entry, Mapping):
        return None
    name = entry.get("name")
    if not isinstance(name, str) or name in ("", ".", "..", _PLACEHOLDER) or "/" in name or "\\" in name:
        return None
    if entry.get("id") is None:
        return name, True, None
    metadata = entry.get("metadata")
    size = metadata.get("size") if isinstance(metadata, Mapping) else None
    return name, False, size if isinstance(size, int) and not isinstance(size, bool) else None


def storage_sources(
    storage: AsyncStorageClient, http: httpx.AsyncClient, project_url: str
) -> dict[str, SourceFactory]:
    """The mapping DatasetPreparer(sources=...) takes: `storage` refs served from this project."""
    project = origin_of(project_url)

    def factory(ref: HttpRef | StorageRef) -> RemoteSource:
        if not isinstance(ref, StorageRef):
            raise TypeError("StorageSource serves storage references only")
        if ref.origin is not None and origin_of(ref.origin) != project:
            raise DatasetError(
                f"{ref.display}: the Storage URL belongs to {ref.origin}, not to this agent's project "
                f"({project}); use a storage:bucket/path URI or a URL of this project"
            )
        return StorageSource(ref, storage, http, project)

    return {"storage": factory}
