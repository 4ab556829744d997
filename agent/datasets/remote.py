"""The seam for remote datasets: a folder of files that can be listed and fetched.

A source only talks to its server and classifies failures; retries (tenacity), concurrency, size
checks against listed sizes, atomic writes and caching are done once, by the preparer, for every
source. To add a backend (Supabase Storage, say), implement `RemoteSource` and register a
`SourceFactory` under the reference kind it serves (`"storage"`) in `DatasetPreparer(sources=...)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agent.datasets.refs import HttpRef, StorageRef


@dataclass(frozen=True, slots=True)
class RemoteFile:
    """One file of a listing."""

    path: str  # POSIX, relative to the source's root folder (the YAML's folder), no leading slash
    size: int | None = None  # bytes, when the listing says


class RemoteError(Exception):
    """A permanent failure of a remote source (refused, bad response): not retried."""


class RemoteNotFound(RemoteError):
    """The object does not exist (HTTP 404/410); permanent."""


class RemoteTransient(RemoteError):
    """Worth retrying: connection failure, timeout, 5xx, 429, a short or overlong body."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ListingUnavailable(RemoteError):
    """The server will not list this folder (no directory index, or listing forbidden)."""


class RemoteSource(Protocol):
    """A remote folder holding a dataset YAML, with `images/` and `labels/` somewhere beneath it."""

    @property
    def cache_key(self) -> str:
        """Stable identity of the dataset for the cache; never contains tokens or secrets."""
        ...

    def describe(self, path: str) -> str:
        """Where `path` lives, for logs and error messages (a URL without its token)."""
        ...

    async def list_files(self, prefix: str) -> list[RemoteFile]:
        """Every file under folder `prefix` ("" is the root), recursively; [] when the folder is absent.

        Raises ListingUnavailable when the server cannot list, RemoteTransient to be retried.
        """
        ...

    async def fetch(self, path: str, dest: Path) -> int:
        """Write the object at `path` to `dest` (its folder exists) and return the bytes written.

        Raises RemoteNotFound, RemoteTransient (including a body shorter or longer than announced)
        or RemoteError. The caller writes to a temporary `dest` and renames it when complete.
        """
        ...

    async def aclose(self) -> None:
        """Release connections; the source is not used afterwards."""
        ...


SourceFactory = Callable[[HttpRef | StorageRef], RemoteSource]
"""Builds a source rooted at the referenced YAML's folder; keyed by `ref.kind` ("http", "storage")."""
