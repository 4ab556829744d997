"""Remote datasets: index the files a YAML names, then bring them into the cache.

Files are found, in order of preference, from a `manifest.txt` beside the YAML (relative paths, one
per line), from `.txt` split lists (then each image's label is probed: a missing one is a
background image), or from folder listings of the split folders and their `labels/` twins. Each sync
fetches the YAML, the lists and the listings again (they are small) and downloads only files that
the cache lacks, so a later run reuses the cache and still sees a dataset that grew. With the source
unreachable (or the agent offline) a cache whose last sync completed is used as it is.

The manifest probe goes out with the YAML, and every listing and list file a YAML names at once:
a sync costs a few round trips, not one per folder. With `relist_after` > 0, a complete cache whose
listing is younger than that many seconds and whose YAML came back byte for byte the same is used
without listing again: one request per run, at the price of not seeing files added meanwhile.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import posixpath
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agent.datasets.aio import for_each
from agent.datasets.cache import DatasetCache, DownloadFailed, Fetcher
from agent.datasets.paths import join_rel
from agent.datasets.policy import shorten
from agent.datasets.remote import ListingUnavailable, RemoteFile, RemoteNotFound, RemoteSource
from agent.datasets.spec import (
    DatasetPlan,
    DatasetSpec,
    SplitPlan,
    is_image,
    label_for,
    labels_folder,
    list_entry,
    list_lines,
    load_spec,
    split_entry,
)
from agent.domain.errors import DatasetError

if TYPE_CHECKING:
    from loguru import Logger

MANIFEST = "manifest.txt"


@dataclass(slots=True)
class SyncStats:
    downloaded: int = 0
    bytes: int = 0
    cached: int = 0
    probed: int = 0
    offline_reuse: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "downloaded": self.downloaded,
            "downloaded_bytes": self.bytes,
            "cached": self.cached,
            "probed": self.probed,
            "offline_reuse": self.offline_reuse,
        }


@dataclass(slots=True)
class _Index:
    root: str  # the dataset root, relative to the source root (the YAML's folder)
    splits: dict[str, SplitPlan] = field(default_factory=dict)
    sizes: dict[str, int | None] = field(default_factory=dict)  # source-relative → listed size
    labels: set[str] = field(default_factory=set)  # root-relative, known to exist
    listed: set[str] = field(default_factory=set)  # root-relative .txt files seen in listings or the manifest
    authoritative: set[str] = field(default_factory=set)  # images whose label folder was listed
    absent: set[str] = field(default_factory=set)  # root-relative, known not to exist
    probe: set[str] = field(default_factory=set)  # root-relative, existence unknown


async def sync_remote(
    source: RemoteSource,
    yaml_name: str,
    cache: DatasetCache,
    fetcher: Fetcher,
    *,
    offline: bool,
    log: Logger,
    relist_after: float = 0.0,
    room: Callable[[int], Awaitable[None]] | None = None,
) -> tuple[DatasetPlan, SyncStats]:
    """The dataset's plan, every file it names present in the cache; the caller holds the cache lock.

    `relist_after`: seconds for which a complete cache's listing is trusted while the YAML stays
    byte-identical (0: list on every sync). `room(bytes)` is awaited before the files are
    downloaded, with the bytes their listings announce; it raises when the disk is too full.
    """
    stats = SyncStats()
    previous = await asyncio.to_thread(cache.read_marker)
    if offline and previous is not None:
        log.info("offline: using the cached dataset")
        return await _from_marker(source, cache, previous, stats)
    reusable = previous is not None and _listing_fresh(previous, yaml_name, relist_after)
    # A listing that may be reused needs no manifest; otherwise it rides along with the YAML.
    manifest = None if reusable else asyncio.ensure_future(_manifest(fetcher))
    try:
        try:
            await fetcher.fetch(yaml_name)
        except RemoteNotFound as exc:
            raise DatasetError(f"dataset YAML not found: {source.describe(yaml_name)}") from exc
        except DownloadFailed as exc:
            if previous is None:
                raise
            log.bind(error=str(exc)).warning(
                "dataset source unreachable; using the cache of its last complete download"
            )
            return await _from_marker(source, cache, previous, stats)
        data = await asyncio.to_thread((cache.files / yaml_name).read_bytes)
        digest = hashlib.sha256(data).hexdigest()
        if reusable and previous is not None and previous.get("yaml_sha256") == digest:
            reused = await _reuse(source, cache, previous, fetcher, stats, log)
            if reused is not None:
                return reused
        if manifest is None:
            manifest = asyncio.ensure_future(_manifest(fetcher))
        await asyncio.to_thread(cache.clear_marker)
        spec = load_spec(_decode(data, yaml_name), source.describe(yaml_name), echo=False)
        listed_at = time.time()
        index = await _index(source, spec, yaml_name, fetcher, previous, manifest)
    finally:
        if manifest is not None:
            manifest.cancel()
            await asyncio.gather(manifest, return_exceptions=True)
    await _download(index, cache, fetcher, previous, stats, room)
    files = await asyncio.to_thread(_sizes, cache, index, yaml_name)
    content = {
        "yaml": yaml_name,
        "yaml_sha256": digest,
        "listed_at": listed_at,
        "root": index.root,
        "splits": {k: {"images": list(v.images), "directory": v.directory} for k, v in index.splits.items()},
        "labels": sorted(index.labels),
        "absent": sorted(index.absent),
        "files": files,
        "source": source.describe(yaml_name),
    }
    await asyncio.to_thread(cache.write_marker, content)
    stats.downloaded, stats.bytes = fetcher.downloaded, fetcher.bytes
    plan = DatasetPlan(
        root=cache.files / index.root if index.root else cache.files,
        spec=spec,
        splits=index.splits,
        labels=frozenset(index.labels),
        source=source.describe(yaml_name),
        echo=False,
    )
    return plan, stats


def remote_root(path: str | None, where: str) -> str:
    """The dataset root of a remote YAML: its `path:` must stay inside the YAML's folder."""
    if path is None:
        return ""
    try:
        return join_rel("", path, "dataset YAML 'path'")
    except DatasetError as exc:
        raise DatasetError(
            f"dataset YAML 'path: {path}' points outside the dataset's folder; "
            f"remove it or make it relative to the YAML: {where}"
        ) from exc


def _listing_fresh(marker: dict[str, Any], yaml_name: str, relist_after: float) -> bool:
    listed_at = marker.get("listed_at")
    if relist_after <= 0 or marker.get("yaml") != yaml_name or not isinstance(listed_at, int | float):
        return False
    # Wall clock: the marker outlives the process. A listing from the future (clock set back) is stale.
    return 0 <= time.time() - listed_at < relist_after


async def _reuse(
    source: RemoteSource,
    cache: DatasetCache,
    marker: dict[str, Any],
    fetcher: Fetcher,
    stats: SyncStats,
    log: Logger,
) -> tuple[DatasetPlan, SyncStats] | None:
    """The plan of a complete cache, its listing young enough and its YAML unchanged; None: re-list."""
    try:
        plan, stats = await _from_marker(source, cache, marker, stats)
    except DatasetError as exc:
        log.bind(error=str(exc)).info("cached dataset incomplete; listing the source again")
        return None
    # The YAML was downloaded again, so it is not counted as cached, just as a sync that lists.
    stats.offline_reuse, stats.cached = 0, stats.cached - (marker["yaml"] in marker["files"])
    stats.downloaded, stats.bytes = fetcher.downloaded, fetcher.bytes
    log.bind(listed_s_ago=round(time.time() - float(marker["listed_at"]), 1)).debug(
        "dataset YAML unchanged and its listing recent: using the cache without listing"
    )
    return plan, stats


async def _index(
    source: RemoteSource,
    spec: DatasetSpec,
    yaml_name: str,
    fetcher: Fetcher,
    previous: dict[str, Any] | None,
    manifest_fetch: Awaitable[list[RemoteFile] | None],
) -> _Index:
    """What the dataset holds: each split's images, and which labels exist, are absent or need a probe."""
    index = _Index(root=remote_root(spec.path, source.describe(yaml_name)))
    manifest = await manifest_fetch
    for f in manifest or []:
        inside = _inside(index.root, f.path)
        if inside is not None and f.path.endswith(".txt"):
            index.listed.add(inside)
    old_absent = set(previous.get("absent", [])) if previous and previous.get("root") == index.root else set()
    checked = _checked_entries(spec, index.root)
    texts, listings = await _lists_and_listings(checked, fetcher, manifest)
    for name, items in checked.items():
        index.splits[name] = _split_plan(source, spec, index, name, items, texts, listings, manifest)
    _sort_labels(index, manifest, old_absent)
    return index


def _checked_entries(spec: DatasetSpec, root: str) -> dict[str, list[tuple[str, str]]]:
    """Every split entry checked before anything is fetched: (its path under the root, how to name it)."""
    checked: dict[str, list[tuple[str, str]]] = {}
    for name, entries in spec.splits.items():
        checked[name] = []
        for entry in entries:
            what = f"dataset YAML '{name}: {entry[:200]}'"
            rel = split_entry(root, entry, what)
            _under(root, rel, what)
            checked[name].append((rel, what))
    return checked


async def _lists_and_listings(
    checked: dict[str, list[tuple[str, str]]], fetcher: Fetcher, manifest: list[RemoteFile] | None
) -> tuple[dict[str, str], dict[str, list[RemoteFile]]]:
    """Every list file and folder listing fetched at once, awaited in the YAML's order.

    So the plan and the first error are as they would be one by one.
    """
    text_tasks: dict[str, asyncio.Task[str]] = {}
    listing_tasks: dict[str, asyncio.Task[list[RemoteFile]]] = {}
    in_order: list[asyncio.Task[Any]] = []
    for rel, what in (item for items in checked.values() for item in items):
        if rel.endswith(".txt"):
            if rel not in text_tasks:
                text_tasks[rel] = asyncio.create_task(_fetch_list(fetcher, rel, what))
                in_order.append(text_tasks[rel])
        elif not is_image(rel) and manifest is None:
            for folder in _listed_folders(rel):
                if folder not in listing_tasks:
                    listing_tasks[folder] = asyncio.create_task(_list_folder(fetcher, folder, what))
                    in_order.append(listing_tasks[folder])
    await _in_order(in_order)
    texts = {rel: task.result() for rel, task in text_tasks.items()}
    listings = {folder: task.result() for folder, task in listing_tasks.items()}
    return texts, listings


def _split_plan(
    source: RemoteSource,
    spec: DatasetSpec,
    index: _Index,
    name: str,
    items: list[tuple[str, str]],
    texts: dict[str, str],
    listings: dict[str, list[RemoteFile]],
    manifest: list[RemoteFile] | None,
) -> SplitPlan:
    """One split's images, from its list files, image paths and folders."""
    images: list[str] = []
    folders: list[str] = []
    for rel, what in items:
        if rel.endswith(".txt"):
            images.extend(_from_list(index, rel, texts[rel], what))
        elif is_image(rel):
            images.append(_under(index.root, rel, what))
        else:
            folders.append(rel)
            images.extend(_from_folder(index, manifest, listings, rel))
    entries = spec.splits[name]
    if not images:
        shown = ", ".join(source.describe(e) for e in folders or entries)
        raise DatasetError(
            f"dataset YAML '{name}' has no images at {shown}; the server must list folders, "
            f"or put {MANIFEST} beside the YAML, or list images in .txt files"
        )
    directory = _under(index.root, folders[0], name) if len(entries) == 1 and folders else None
    return SplitPlan(images=tuple(dict.fromkeys(images)), directory=directory)


def _sort_labels(index: _Index, manifest: list[RemoteFile] | None, old_absent: set[str]) -> None:
    """Each image's label: listed (fetch it), known absent, or to be probed."""
    for split in index.splits.values():
        for image in split.images:
            label = label_for(image)
            if label in index.listed:
                index.labels.add(label)
            elif manifest is not None or image in index.authoritative or label in old_absent:
                index.absent.add(label)
            else:
                index.probe.add(label)
    index.probe -= index.labels | index.absent


async def _manifest(fetcher: Fetcher) -> list[RemoteFile] | None:
    if await fetcher.fetch_optional(MANIFEST) is None:
        return None
    text = await asyncio.to_thread(_read_text, fetcher.cache, MANIFEST)
    lines = enumerate(list_lines(text), 1)
    return [RemoteFile(join_rel("", line, f"{MANIFEST} line {n}", echo=False)) for n, line in lines]


async def _in_order(tasks: list[asyncio.Task[Any]]) -> None:
    """Await tasks running at once in their order: the first failure in that order cancels the rest."""
    try:
        for task in tasks:
            await task
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _listed_folders(rel: str) -> list[str]:
    """An images folder is listed with its labels twin."""
    twin = labels_folder(rel)
    return [rel] if twin is None else [rel, twin]


async def _fetch_list(fetcher: Fetcher, rel: str, what: str) -> str:
    if await fetcher.fetch_optional(rel) is None:
        raise DatasetError(f"{what}: list file not found: {fetcher.source.describe(rel)}")
    return await asyncio.to_thread(_read_text, fetcher.cache, rel)


async def _list_folder(fetcher: Fetcher, folder: str, what: str) -> list[RemoteFile]:
    try:
        return await fetcher.list_files(folder)
    except ListingUnavailable as exc:
        raise DatasetError(
            f"{what}: cannot list {fetcher.source.describe(folder)}/ ({exc}); "
            f"serve directory listings, or put {MANIFEST} beside the YAML, or list images in .txt files"
        ) from exc


def _from_list(index: _Index, rel: str, text: str, what: str) -> list[str]:
    folder = posixpath.dirname(rel)
    images = []
    for n, line in enumerate(list_lines(text), 1):
        if not is_image(line):
            continue
        # Line numbers, not the lines: a downloaded file's content never reaches a message.
        source_rel = list_entry(folder, line, f"{what} line {n}", echo=False)
        images.append(_under(index.root, source_rel, f"{what} line {n}"))
        index.sizes.setdefault(source_rel, None)
    return images


def _from_folder(
    index: _Index, manifest: list[RemoteFile] | None, listings: dict[str, list[RemoteFile]], rel: str
) -> list[str]:
    listed: list[RemoteFile] = []
    for folder in _listed_folders(rel):
        if manifest is not None:
            prefix = folder + "/" if folder else ""
            listed.extend(f for f in manifest if f.path.startswith(prefix))
        else:
            listed.extend(listings[folder])
    images = []
    for f in listed:
        inside = _inside(index.root, f.path)
        if inside is None:
            continue
        if f.path.startswith(rel + "/" if rel else "") and is_image(f.path):
            images.append(inside)
            index.sizes[f.path] = f.size
        elif f.path.endswith(".txt"):
            index.listed.add(inside)
            index.sizes[f.path] = f.size
    images.sort()
    index.authoritative.update(images)
    return images


async def _download(
    index: _Index,
    cache: DatasetCache,
    fetcher: Fetcher,
    previous: dict[str, Any] | None,
    stats: SyncStats,
    room: Callable[[int], Awaitable[None]] | None,
) -> None:
    old_sizes: dict[str, int] = previous.get("files", {}) if previous else {}

    def source_rel(rel: str) -> str:
        return f"{index.root}/{rel}" if index.root else rel

    wanted: dict[str, int | None] = {}
    for split in index.splits.values():
        for image in split.images:
            wanted[source_rel(image)] = None
    for label in index.labels:
        wanted[source_rel(label)] = None
    for rel in wanted:
        size = index.sizes.get(rel)
        wanted[rel] = size if size is not None else old_sizes.get(rel)
    present = await asyncio.to_thread(cache.present, wanted.items())
    missing = [(rel, size) for rel, size in wanted.items() if rel not in present]
    # A size remembered from an earlier sync only vouches for the copy in the cache, not for the server.
    to_fetch = [(rel, index.sizes.get(rel)) for rel, _ in missing]
    stats.cached = len(present)
    if room is not None:
        await room(sum(size or 0 for _, size in to_fetch))
    await fetcher.fetch_all(sorted(to_fetch))

    probes = sorted(index.probe)
    probe_present = await asyncio.to_thread(
        cache.present, [(source_rel(p), old_sizes.get(source_rel(p))) for p in probes]
    )
    unknown = [p for p in probes if source_rel(p) not in probe_present]
    index.labels.update(p for p in probes if source_rel(p) in probe_present)
    stats.cached += len(probe_present)
    stats.probed = len(unknown)

    async def probe(label: str) -> None:
        if await fetcher.fetch_optional(source_rel(label)) is None:
            index.absent.add(label)
        else:
            index.labels.add(label)

    await for_each(unknown, probe, fetcher.concurrency)


async def _from_marker(
    source: RemoteSource, cache: DatasetCache, marker: dict[str, Any], stats: SyncStats
) -> tuple[DatasetPlan, SyncStats]:
    yaml_name = str(marker["yaml"])
    text = await asyncio.to_thread(_read_text, cache, yaml_name)
    spec = load_spec(text, source.describe(yaml_name), echo=False)
    files: dict[str, int] = marker["files"]
    present = await asyncio.to_thread(cache.present, files.items())
    if len(present) != len(files):
        raise DatasetError(
            f"dataset source unreachable and its cached copy is incomplete "
            f"({len(files) - len(present)} files missing): {source.describe(yaml_name)}"
        )
    root = str(marker["root"])
    splits = {
        name: SplitPlan(images=tuple(value["images"]), directory=value["directory"])
        for name, value in marker["splits"].items()
    }
    stats.cached = len(files)
    stats.offline_reuse = 1
    plan = DatasetPlan(
        root=cache.files / root if root else cache.files,
        spec=spec,
        splits=splits,
        labels=frozenset(marker["labels"]),
        source=source.describe(yaml_name),
        echo=False,
    )
    return plan, stats


def _under(root: str, rel: str, what: str) -> str:
    inside = _inside(root, rel)
    if inside is None:
        raise DatasetError(f"{what}: the path is outside the dataset folder {shorten(root or '.')}")
    return inside


def _inside(root: str, rel: str) -> str | None:
    if not root:
        return rel
    if rel == root:
        return ""
    return rel[len(root) + 1 :] if rel.startswith(root + "/") else None


def _read_text(cache: DatasetCache, rel: str) -> str:
    return _decode((cache.files / rel).read_bytes(), rel)


def _decode(data: bytes, rel: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{rel} is not UTF-8 text") from exc


def _sizes(cache: DatasetCache, index: _Index, yaml_name: str) -> dict[str, int]:
    # The YAML is listed too: a cache reused offline must hold the YAML its plan was made from.
    top = str(cache.files)
    sizes: dict[str, int] = {yaml_name: os.stat(f"{top}/{yaml_name}").st_size}
    prefix = f"{index.root}/" if index.root else ""
    rels = [prefix + i for s in index.splits.values() for i in s.images] + [
        prefix + lbl for lbl in index.labels
    ]
    for rel in rels:
        sizes[rel] = os.stat(f"{top}/{rel}").st_size
    return sizes
