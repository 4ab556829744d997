"""Dataset download from Supabase Storage: the agent's concurrent, cached fetch against one-by-one.

    python bench/fetch.py [--quick]

The dataset: 2,000 small files (1,000 synthetic 32 px JPEGs and their 1,000 label files, split
800/200 into train and val) plus data.yaml, uploaded to a bucket of the Supabase stand-in
(bench/standin_server.py, a subprocess), which then adds 20 ms to every Storage request.

- files_per_s: files downloaded (the 2,000 and the YAML) / seconds of a cold sync through the
  agent's own dataset code, as DatasetPreparer runs it for a `storage:bucket/path` dataset: the
  supabase backend's StorageSource (storage3 on the backend's HTTP client, a fresh one as
  open_supabase makes it) and agent.datasets' DatasetCache, Fetcher (retries, size checks,
  DOWNLOAD_CONCURRENCY=16 at once) and sync_remote (YAML, folder listings, downloads), timed
  from the start to the complete cache marker.
- cache_speedup: cold seconds / the median of three more syncs with the cache complete, as the
  agent syncs by default (DatasetPreparer's relist_after=0): a warm sync still fetches the YAML
  and lists the folders (to see a dataset that changed) but downloads nothing.
- cache_speedup_relist_after: the same with relist_after=300 (seconds): a warm sync within that
  time of the last listing fetches the YAML and, the YAML unchanged, checks the cached files
  against the marker without listing (files added to the folders meanwhile are not seen).
- baseline_files_per_s: the old script's way, downloading one file after the other with the same
  storage3 client into a folder (no cache, the old script downloaded per run), after listing
  the same folders. --quick times the first 500 files of the listing (the rate is what counts).
- speedup: files_per_s / baseline_files_per_s.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, Bench, Postgres, emit, log, machine, parse_args, percentile
from bench.standin import start_standin

BUCKET = "datasets"
PREFIX = "bench/shapes"
LATENCY_S = 0.020
RELIST_AFTER_S = 300.0
TRAIN, VAL = 800, 200


def make_files(bench: Bench) -> tuple[Path, list[Path]]:
    from agent.datasets.synthetic import make_dataset

    yaml_path = make_dataset(bench.tmp / "dataset", "detect", train=TRAIN, val=VAL, imgsz=32)
    root = yaml_path.parent
    # A remote YAML's `path:` must stay inside its folder: drop the local absolute one.
    yaml_path.write_text(
        "\n".join(line for line in yaml_path.read_text().splitlines() if not line.startswith("path:"))
    )
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return root, files


async def upload(client: Any, root: Path, files: list[Path]) -> None:
    from storage3.exceptions import StorageApiError

    with contextlib.suppress(StorageApiError):  # already there
        await client.storage.create_bucket(BUCKET, options={"public": False})
    bucket = client.storage.from_(BUCKET)
    slots = asyncio.Semaphore(32)

    async def one(path: Path, data: bytes) -> None:
        key = f"{PREFIX}/{path.relative_to(root).as_posix()}"
        ctype = "text/plain" if path.suffix in (".txt", ".yaml") else "image/jpeg"
        async with slots:
            await bucket.upload(key, data, {"content-type": ctype, "upsert": "true"})

    contents = await asyncio.to_thread(lambda: [p.read_bytes() for p in files])
    await asyncio.gather(*(one(p, data) for p, data in zip(files, contents, strict=True)))


async def agent_sync(
    client: Any, http: Any, url: str, cache_root: Path, relist_after: float = 0.0
) -> tuple[float, dict[str, int]]:
    """One sync as DatasetPreparer._remote runs it; (seconds, its stats)."""
    from loguru import logger

    from agent.backends.supabase import storage_sources
    from agent.config import Settings
    from agent.datasets import RetryPolicy, parse_dataset_ref
    from agent.datasets.cache import DatasetCache, Fetcher
    from agent.datasets.sync import sync_remote

    ref = parse_dataset_ref(f"storage:{BUCKET}/{PREFIX}/data.yaml", None, BUCKET)
    started = time.monotonic()
    source = storage_sources(client.storage, http, url)["storage"](ref)
    try:
        cache = DatasetCache(cache_root, source.cache_key)
        fetcher = Fetcher(source, cache, RetryPolicy(), Settings().download_concurrency, logger)
        async with cache.locked(logger):
            _, stats = await sync_remote(
                source, ref.yaml_name, cache, fetcher, offline=False, log=logger, relist_after=relist_after
            )
    finally:
        await source.aclose()
    return time.monotonic() - started, stats.as_dict()


async def sequential(client: Any, dest: Path, limit: int | None) -> tuple[float, int]:
    """The old way: list images/ and labels/, then download one file after the other."""
    bucket = client.storage.from_(BUCKET)
    started = time.monotonic()
    names = [f"{PREFIX}/data.yaml"]
    for folder in ("images/train", "images/val", "labels/train", "labels/val"):
        entries = await bucket.list(f"{PREFIX}/{folder}", {"limit": 10000, "offset": 0})
        names.extend(f"{PREFIX}/{folder}/{e['name']}" for e in entries if e.get("id"))
    names = names[:limit] if limit else names
    for name in names:
        data = await bucket.download(name)
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return time.monotonic() - started, len(names)


async def measure(
    info: dict[str, str], root: Path, files: list[Path], tmp: Path, quick: bool
) -> dict[str, Any]:
    from agent.backends.supabase import connect_client
    from agent.backends.supabase.transport import http_client

    @contextlib.asynccontextmanager
    async def fresh_client() -> AsyncIterator[tuple[Any, Any]]:
        """A supabase client on its own HTTP client, as open_supabase makes them (no warm pool)."""
        http = http_client()
        try:
            yield await connect_client(info["url"], info["service_role_key"], http), http
        finally:
            await http.aclose()

    async with asyncio.timeout(900):
        async with fresh_client() as (client, _):
            started = time.monotonic()
            await upload(client, root, files)
            log(f"uploaded {len(files)} files in {time.monotonic() - started:.1f}s")
        async with fresh_client() as (client, http):
            cold_s, cold = await agent_sync(client, http, info["url"], tmp / "cache")
            log(f"agent cold sync: {cold_s:.2f}s {cold}")
            warm = [await agent_sync(client, http, info["url"], tmp / "cache") for _ in range(3)]
            warm_s = percentile([s for s, _ in warm], 50)
            log(f"agent warm syncs: {[round(s, 3) for s, _ in warm]} {warm[0][1]}")
            fresh = [
                await agent_sync(client, http, info["url"], tmp / "cache", RELIST_AFTER_S) for _ in range(3)
            ]
            fresh_s = percentile([s for s, _ in fresh], 50)
            shown = [round(s, 3) for s, _ in fresh]
            log(f"agent warm syncs, relist_after={RELIST_AFTER_S:g}: {shown} {fresh[0][1]}")
        async with fresh_client() as (client, _):
            base_s, base_n = await sequential(client, tmp / "old", 500 if quick else None)
            log(f"old way: {base_n} files in {base_s:.1f}s")
    if cold["downloaded"] < len(files):
        raise RuntimeError(f"the agent downloaded {cold['downloaded']} of {len(files)} files")
    files_per_s = cold["downloaded"] / cold_s
    baseline = base_n / base_s
    return {
        "files": len(files) - 1,
        "files_per_s": round(files_per_s, 1),
        "baseline_files_per_s": round(baseline, 1),
        "speedup": round(files_per_s / baseline, 1),
        "first_fetch_s": round(cold_s, 3),
        "cached_fetch_s": round(warm_s, 3),
        "cache_speedup": round(cold_s / warm_s, 1),
        "cached_fetch_relist_after_s": round(fresh_s, 3),
        "cache_speedup_relist_after": round(cold_s / fresh_s, 1),
        "relist_after_s": RELIST_AFTER_S,
        "baseline_files": base_n,
        "latency_ms": LATENCY_S * 1000,
    }


def main() -> None:
    args = parse_args()
    started = time.monotonic()
    with Bench() as bench:
        from loguru import logger

        logger.remove()
        logger.add(sys.stderr, level="WARNING", diagnose=False)
        root, files = make_files(bench)
        pg = Postgres(bench)
        db = pg.database()
        info = start_standin(
            bench,
            db,
            command=(str(REPO / "bench" / "standin_server.py"),),
            extra=("--storage-latency", str(LATENCY_S)),
        )
        result = asyncio.run(measure(info, root, files, bench.tmp, args.quick))
    emit(
        {
            "bench": "fetch",
            "backend": "supabase",
            **result,
            "target_speedup": 8,
            "target_cache_speedup": 50,
            "met": result["speedup"] >= 8 and result["cache_speedup"] >= 50,
            "met_relist_after": result["speedup"] >= 8 and result["cache_speedup_relist_after"] >= 50,
            "wall_s": round(time.monotonic() - started, 1),
            **machine(),
        }
    )


if __name__ == "__main__":
    main()
