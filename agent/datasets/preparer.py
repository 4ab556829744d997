"""The `Datasets` port: resolve a run's `data_yaml` into `<workspace>/dataset/`."""

from __future__ import annotations

import asyncio
import errno
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from loguru import logger

from agent.datasets.cache import DatasetCache, Fetcher, RetryPolicy, evict
from agent.datasets.disk import DiskSpace
from agent.datasets.http import HttpSource
from agent.datasets.local import plan_local
from agent.datasets.policy import SourcePolicy, shorten
from agent.datasets.refs import HttpRef, LocalRef, StorageRef, parse_dataset_ref
from agent.datasets.remote import RemoteSource, SourceFactory
from agent.datasets.spec import DatasetPlan
from agent.datasets.sync import sync_remote
from agent.datasets.workspace import Built, build_workspace
from agent.domain.errors import DatasetError
from agent.domain.request import TrainingRequest
from agent.ports import PreparedDataset

if TYPE_CHECKING:
    from loguru import Logger

T = TypeVar("T")
WORKSPACE_DATASET = "dataset"
MAX_MESSAGE = 1000


class DatasetPreparer:
    """Local, HTTP(S) and (with a registered source) Storage datasets, cached and normalized per run.

    The defaults are the strict ones (design §11): local paths only under `policy.roots`, no
    private addresses, one dataset bucket. The embedded backend's wiring loosens them.
    """

    def __init__(
        self,
        dataset_root: Path | None,
        cache_root: Path,
        concurrency: int = 16,
        sources: Mapping[str, SourceFactory] | None = None,
        *,
        retry: RetryPolicy | None = None,
        offline: bool = False,
        default_bucket: str = "datasets",
        http_timeout: float = 60.0,
        relist_after: float = 0.0,
        policy: SourcePolicy | None = None,
        cache_max_bytes: int = 0,
        disk: DiskSpace | None = None,
    ) -> None:
        """`relist_after`: seconds for which a remote dataset's last listing is trusted while its YAML
        is unchanged, so a run that follows soon after another skips the folder listings (it then
        does not see files added meanwhile); 0 lists on every run. `cache_max_bytes`: the cache's
        size cap, least recently used entries evicted beyond it; 0: no cap."""
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if relist_after < 0:
            raise ValueError("relist_after must be >= 0")
        self.dataset_root = dataset_root.absolute() if dataset_root is not None else None
        self.cache_root = cache_root.absolute()
        self.concurrency = concurrency
        self.retry = retry or RetryPolicy()
        self.offline = offline
        self.default_bucket = default_bucket
        self.relist_after = relist_after
        self.policy = policy or SourcePolicy(
            roots=(self.dataset_root,) if self.dataset_root is not None else (), buckets=(default_bucket,)
        )
        self.cache_max_bytes = cache_max_bytes
        self.disk = disk or DiskSpace(0)
        allow_private = self.policy.allow_private_urls

        def http(ref: HttpRef | StorageRef) -> RemoteSource:
            return HttpSource.create(
                ref, concurrency=concurrency, timeout=http_timeout, allow_private=allow_private
            )

        self._sources: dict[str, SourceFactory] = {"http": http, **(sources or {})}

    async def prepare(self, request: TrainingRequest, run_id: str, workspace: Path) -> PreparedDataset:
        """Build `<workspace>/dataset/` for the run; DatasetError with a message for the user."""
        ref = parse_dataset_ref(request.data_yaml, self.dataset_root, self.default_bucket)
        log = logger.bind(run_id=run_id, source=ref.display[:200])
        try:
            self._admit(ref)
            prepared = await self._prepare(ref, request, workspace, log)
            await asyncio.to_thread(self.disk.check, workspace, 0, "to train")
            return prepared
        except DatasetError as exc:
            if len(str(exc)) <= MAX_MESSAGE:
                raise
            # Paths and names inside a message come from the row or the dataset: bound the whole.
            raise DatasetError(str(exc)[: MAX_MESSAGE - 1] + "…") from exc
        except ValueError as exc:
            # A path the OS cannot take (an embedded NUL byte, say): the row's fault, not the agent's.
            reason = shorten(str(exc), 100)
            raise DatasetError(
                f"dataset preparation failed (invalid path or value: {reason}): {ref.display[:200]}"
            ) from exc
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise DatasetError(f"no space left on the disk for the dataset: {ref.display[:200]}") from exc
            # strerror, not str(exc): the latter repeats the (row-chosen, unbounded) file names.
            reason = exc.strerror or type(exc).__name__
            raise DatasetError(f"dataset preparation failed ({reason}): {ref.display[:200]}") from exc

    def _admit(self, ref: LocalRef | HttpRef | StorageRef) -> None:
        """The source rules that need no I/O: buckets, and the Supabase host being Storage only."""
        if isinstance(ref, StorageRef):
            self.policy.check_bucket(ref.bucket, ref.display[:200])
        elif isinstance(ref, HttpRef) and self.policy.is_storage_host(ref.url):
            raise DatasetError(
                f"{ref.display[:200]} is on the Supabase project but is not a Storage object URL; "
                f"use storage:bucket/path"
            )

    async def _prepare(
        self, ref: LocalRef | HttpRef | StorageRef, request: TrainingRequest, workspace: Path, log: Logger
    ) -> PreparedDataset:
        started = time.monotonic()
        dataset_dir = workspace / WORKSPACE_DATASET

        def build(plan: DatasetPlan) -> Callable[[threading.Event], Built]:
            return lambda stop: build_workspace(plan, request.task, dataset_dir, log, stop)

        if isinstance(ref, LocalRef):
            dataset_root, policy = self.dataset_root, self.policy
            plan = await _blocking(lambda stop: plan_local(ref.path, dataset_root, log, stop, policy))
            built, counts = await _blocking(build(plan)), dict[str, int]()
        else:
            built, counts = await self._remote(ref, build, log)
        summary = {**built.summary, **counts}
        log.bind(task=built.task, seconds=round(time.monotonic() - started, 2), **summary).debug(
            "dataset workspace ready"
        )
        return PreparedDataset(yaml_path=built.yaml_path, task=built.task, summary=summary)

    async def _remote(
        self,
        ref: HttpRef | StorageRef,
        build: Callable[[DatasetPlan], Callable[[threading.Event], Built]],
        log: Logger,
    ) -> tuple[Built, dict[str, int]]:
        factory = self._sources.get(ref.kind)
        if factory is None:
            raise DatasetError(
                f"storage datasets need the supabase backend (SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY): "
                f"{ref.display[:200]}"
            )
        source = factory(ref)
        try:
            cache = DatasetCache(self.cache_root, source.cache_key)
            cache_log = log.bind(cache=str(cache.dir))
            fetcher = Fetcher(source, cache, self.retry, self.concurrency, cache_log)
            await asyncio.to_thread(self._make_room, cache, 0, cache_log)
            started = time.monotonic()

            async def room(needed: int) -> None:
                await asyncio.to_thread(self._make_room, cache, needed, cache_log)

            # Held while the workspace links the cached files, so a concurrent sync cannot swap them midway.
            async with cache.locked(cache_log):
                plan, stats = await sync_remote(
                    source,
                    ref.yaml_name,
                    cache,
                    fetcher,
                    offline=self.offline,
                    log=cache_log,
                    relist_after=self.relist_after,
                    room=room,
                )
                cache_log.bind(seconds=round(time.monotonic() - started, 2), **stats.as_dict()).info(
                    "dataset synced"
                )
                await asyncio.to_thread(cache.record_use)
                built = await _blocking(build(plan))
                if self.cache_max_bytes > 0:
                    cap = self.cache_max_bytes
                    await asyncio.to_thread(evict, self.cache_root, lambda total: total <= cap, cache_log)
            return built, stats.as_dict()
        finally:
            await source.aclose()

    def _make_room(self, cache: DatasetCache, needed: int, log: Logger) -> None:
        """Evict unused cache entries while the disk is short, then fail clearly if it still is."""
        if not self.disk.short(self.cache_root, needed):
            return
        root = self.cache_root
        evict(root, lambda _total: not self.disk.short(root, needed), log, keep=cache.dir)
        self.disk.check(self.cache_root, needed, "to download the dataset")


async def _blocking(fn: Callable[[threading.Event], T]) -> T:
    """Run filesystem-heavy work in a thread; a cancelled caller tells the thread to stop early."""
    stop = threading.Event()
    try:
        return await asyncio.to_thread(fn, stop)
    except asyncio.CancelledError:
        stop.set()
        raise


LocalDatasets = DatasetPreparer
