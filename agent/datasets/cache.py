"""The download cache: one folder per source, a lock, a completion marker, and a retrying fetcher.

Files land under `<cache>/<kind>-<hash>/files/` at the path they have below the YAML's folder,
through a temporary name and a rename, so a file present under its final name is complete. The
marker `complete.json` is written last, with the plan and every file's size; it is removed before
a sync changes anything, so a cache without it is partial: resumed, never trusted as a whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt
from tenacity.wait import wait_base, wait_exponential_jitter

from agent.datasets.aio import for_each
from agent.datasets.paths import ensure_inside
from agent.datasets.remote import (
    ListingUnavailable,
    RemoteError,
    RemoteFile,
    RemoteNotFound,
    RemoteSource,
    RemoteTransient,
)
from agent.domain.errors import DatasetError

if TYPE_CHECKING:
    from loguru import Logger

T = TypeVar("T")
MARKER_VERSION = 1
_LOCK_POLL = 0.1
LOCK_NAME = ".lock"
USAGE_NAME = "usage.json"


class DownloadFailed(DatasetError):
    """A download still failing after every retry (offline, server down); a cached copy may stand in."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently transient download failures are retried."""

    attempts: int = 5
    initial: float = 0.5
    maximum: float = 10.0

    def retrying(self, what: str, log: Logger) -> AsyncRetrying:
        return AsyncRetrying(
            retry=retry_if_exception_type(RemoteTransient),
            wait=_WaitRetryAfter(
                wait_exponential_jitter(initial=self.initial, max=self.maximum), self.maximum
            ),
            stop=stop_after_attempt(self.attempts),
            before_sleep=_log_retry(what, log),
            reraise=True,
        )


class _WaitRetryAfter(wait_base):
    """Exponential backoff with jitter, stretched to the server's Retry-After when it asks for longer."""

    def __init__(self, base: wait_base, cap: float) -> None:
        self._base = base
        self._cap = cap

    def __call__(self, retry_state: RetryCallState) -> float:
        wait = self._base(retry_state)
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(exc, RemoteTransient) and exc.retry_after is not None:
            wait = max(wait, min(exc.retry_after, self._cap))
        return wait


def _log_retry(what: str, log: Logger) -> Callable[[RetryCallState], None]:
    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.bind(target=what, attempt=state.attempt_number).warning("retrying download: {}", exc)

    return before_sleep


class DatasetCache:
    """The cache folder of one source."""

    def __init__(self, cache_root: Path, key: str) -> None:
        kind = re.sub(r"[^a-z0-9_-]", "", key.split(":", 1)[0].lower())[:16] or "source"
        digest = hashlib.sha256(key.encode()).hexdigest()[:24]
        self.key = key
        self.dir = cache_root / f"{kind}-{digest}"
        self.files = self.dir / "files"
        self.marker = self.dir / "complete.json"

    @contextlib.asynccontextmanager
    async def locked(self, log: Logger) -> AsyncIterator[None]:
        """Exclusive use of this cache folder, across runs of this agent and other agents on the host."""
        await asyncio.to_thread(self.dir.mkdir, parents=True, exist_ok=True)
        fd = await asyncio.to_thread(os.open, self.dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            waited = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not waited:
                        log.bind(cache=str(self.dir)).info(
                            "waiting for another run to finish with the dataset cache"
                        )
                        waited = True
                    # Probing without blocking keeps the wait cancellable; a lock taken in a thread is not.
                    await asyncio.sleep(_LOCK_POLL)
            # Made under the lock: an eviction that held it before may have removed them.
            await asyncio.to_thread(self.files.mkdir, parents=True, exist_ok=True)
            await asyncio.to_thread(self._write_source)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def read_marker(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("version") != MARKER_VERSION or data.get("key") != self.key:
            return None
        return data

    def clear_marker(self) -> None:
        self.marker.unlink(missing_ok=True)

    def write_marker(self, content: dict[str, Any]) -> None:
        data = {"version": MARKER_VERSION, "key": self.key, **content}
        tmp = self.dir / f".complete.{uuid.uuid4().hex}.tmp"
        tmp.write_text(json.dumps(data, sort_keys=True), encoding="utf-8")
        os.replace(tmp, self.marker)

    def record_use(self) -> int:
        """Stamp this entry as used now, with its size from the marker; returns the size."""
        marker = self.read_marker()
        files = marker.get("files") if marker else None
        if isinstance(files, dict):
            size = sum(v for v in files.values() if isinstance(v, int))
        else:
            size = _tree_size(self.files)
        tmp = self.dir / f".usage.{uuid.uuid4().hex}.tmp"
        tmp.write_text(json.dumps({"bytes": size, "used_at": time.time()}), encoding="utf-8")
        os.replace(tmp, self.dir / USAGE_NAME)
        return size

    def present(self, wanted: Iterable[tuple[str, int | None]]) -> set[str]:
        """Which of `wanted` (path, expected size) are complete files in the cache."""
        have: set[str] = set()
        # Plain strings: a Path per file costs more than its lstat, over thousands of files per sync.
        top = str(self.files)
        for rel, size in wanted:
            try:
                st = os.lstat(f"{top}/{rel}")
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and (size is None or st.st_size == size):
                have.add(rel)
        return have

    def _write_source(self) -> None:
        info = self.dir / "source.txt"
        if not info.exists():
            info.write_text(self.key + "\n", encoding="utf-8")


class Fetcher:
    """Retrying, size-checked, atomic downloads from one source into one cache, bounded in concurrency."""

    def __init__(
        self, source: RemoteSource, cache: DatasetCache, policy: RetryPolicy, concurrency: int, log: Logger
    ) -> None:
        self.source = source
        self.cache = cache
        self.policy = policy
        self.concurrency = concurrency
        self.log = log
        self.downloaded = 0
        self.bytes = 0
        self._slots = asyncio.Semaphore(concurrency)
        self._folders: set[Path] = set()  # cache folders created and checked already

    async def list_files(self, prefix: str) -> list[RemoteFile]:
        return await self._retry(self.source.describe(prefix) + "/", lambda: self.source.list_files(prefix))

    async def fetch(self, rel: str, size: int | None = None) -> int:
        """Download `rel` into the cache; RemoteNotFound is left to the caller, all else is DatasetError."""
        dest = self.cache.files / rel
        written = await self._retry(self.source.describe(rel), lambda: self._fetch_once(rel, dest, size))
        self.downloaded += 1
        self.bytes += written
        return written

    async def fetch_optional(self, rel: str, size: int | None = None) -> int | None:
        """As `fetch`, but None when the object does not exist."""
        try:
            return await self.fetch(rel, size)
        except RemoteNotFound:
            return None

    async def fetch_all(self, items: list[tuple[str, int | None]]) -> None:
        async def one(item: tuple[str, int | None]) -> None:
            try:
                await self.fetch(*item)
            except RemoteNotFound as exc:
                raise DatasetError(f"dataset file not found: {self.source.describe(item[0])}") from exc

        await for_each(items, one, self.concurrency)

    async def _fetch_once(self, rel: str, dest: Path, size: int | None) -> int:
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:12]}.part")
        if dest.parent not in self._folders:
            await asyncio.to_thread(self._make_room, rel, dest)
            self._folders.add(dest.parent)
        try:
            written = await self.source.fetch(rel, tmp)
            if size is not None and written != size:
                raise RemoteTransient(f"size mismatch: listed as {size} bytes, received {written}")
            # A rename is one syscall: cheaper in place than a thread hand-off per file.
            os.replace(tmp, dest)
            return written
        except BaseException:
            # Synchronous on purpose: it must also run while the task is being cancelled.
            _unlink_quietly(tmp)
            raise

    def _make_room(self, rel: str, dest: Path) -> None:
        ensure_inside(dest, self.cache.files, f"download of {self.source.describe(rel)}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        ensure_inside(dest, self.cache.files, f"download of {self.source.describe(rel)}")

    async def _retry(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        async def guarded() -> T:
            async with self._slots:
                return await op()

        try:
            try:
                return await guarded()
            except RemoteTransient as exc:
                failed: list[RemoteTransient] = [exc]

            # The policy is built only after a failure: most files need no retry, and building it
            # per file is a noticeable share of a small file's cost. Its first attempt replays the
            # failure, so attempts, backoff, Retry-After and logging stay the policy's.
            async def again() -> T:
                if failed:
                    raise failed.pop()
                return await guarded()

            result: T = await self.policy.retrying(what, self.log)(again)
            return result
        except (RemoteNotFound, ListingUnavailable):
            raise
        except RemoteTransient as exc:
            raise DownloadFailed(
                f"download failed after {self.policy.attempts} attempts: {what}: {exc}"
            ) from exc
        except RemoteError as exc:
            raise DatasetError(f"download failed: {what}: {exc}") from exc
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise DatasetError(f"no space left for the dataset cache {self.cache.dir}") from exc
            raise DatasetError(f"cannot write the dataset cache ({exc}): {what}") from exc


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


@dataclass(frozen=True, slots=True)
class CacheEntry:
    dir: Path
    bytes: int
    used_at: float


def cache_entries(cache_root: Path) -> list[CacheEntry]:
    """Every source folder of the cache with its size and last use, least recently used first."""
    entries: list[CacheEntry] = []
    try:
        children = list(os.scandir(cache_root))
    except FileNotFoundError:
        return []
    for child in children:
        if not child.is_dir(follow_symlinks=False):
            continue
        folder = Path(child.path)
        try:
            usage = json.loads((folder / USAGE_NAME).read_text(encoding="utf-8"))
            size, used_at = int(usage["bytes"]), float(usage["used_at"])
        except (OSError, ValueError, KeyError, TypeError):
            # A download that never completed: its size is what is on disk, its age the folder's.
            size, used_at = _tree_size(folder / "files"), child.stat(follow_symlinks=False).st_mtime
        entries.append(CacheEntry(folder, size, used_at))
    return sorted(entries, key=lambda e: e.used_at)


def evict(cache_root: Path, enough: Callable[[int], bool], log: Logger, keep: Path | None = None) -> int:
    """Remove least recently used entries until `enough(total bytes left)`; returns bytes removed.

    An entry is never removed while in use: its lock is held (a run is syncing it or building its
    workspace from it), or a workspace still holds hard links to its files (a run trains on them).
    """
    entries = cache_entries(cache_root)
    total = sum(e.bytes for e in entries)
    removed = 0
    for entry in entries:
        if enough(total):
            break
        if entry.bytes == 0 or (keep is not None and entry.dir == keep):
            continue
        if _remove_unused(entry.dir):
            total -= entry.bytes
            removed += entry.bytes
            log.bind(cache=str(entry.dir), bytes=entry.bytes).info("dataset cache entry evicted")
    return removed


def _remove_unused(folder: Path) -> bool:
    try:
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        if _linked_elsewhere(folder / "files"):
            return False
        # The marker goes first: an eviction cut short leaves a partial cache, never a trusted one.
        (folder / "complete.json").unlink(missing_ok=True)
        (folder / USAGE_NAME).unlink(missing_ok=True)
        shutil.rmtree(folder / "files", ignore_errors=True)
        # The folder and its lock stay: a run waiting on this lock must find it where it opened it.
        return True
    finally:
        os.close(fd)


def _linked_elsewhere(top: Path) -> bool:
    for folder, _dirs, files in os.walk(top):
        for name in files:
            try:
                if os.lstat(os.path.join(folder, name)).st_nlink > 1:
                    return True
            except OSError:
                continue
    return False


def _tree_size(top: Path) -> int:
    size = 0
    for folder, _dirs, files in os.walk(top):
        for name in files:
            with contextlib.suppress(OSError):
                size += os.lstat(os.path.join(folder, name)).st_size
    return size
