"""The run's own copy of a dataset: images hard-linked, labels normalized and written fresh, a new YAML.

Nothing here writes into the plan's root (the user's folder or the cache): images are linked or
copied out of it, labels are read from it and written into the workspace.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import yaml

from agent.datasets.labels import LabelStats, infer_task, normalize_text, shape_of
from agent.datasets.paths import ensure_inside
from agent.datasets.spec import DatasetPlan, label_for, workspace_yaml
from agent.domain.errors import DatasetError
from agent.domain.request import Task

if TYPE_CHECKING:
    from loguru import Logger

YAML_NAME = "data.yaml"
SPLIT_LISTS = ".splits"
_MAX_EXAMPLES = 5
_LINK_FALLBACK = frozenset(
    {errno.EXDEV, errno.EPERM, errno.EACCES, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP}
)


@dataclass(frozen=True, slots=True)
class Built:
    yaml_path: Path
    task: Task
    summary: dict[str, int]


def build_workspace(
    plan: DatasetPlan, task: Task | None, dataset_dir: Path, log: Logger, stop: threading.Event | None = None
) -> Built:
    """Write the workspace under `dataset_dir` (replacing an earlier attempt's) and return its YAML."""
    if dataset_dir.is_symlink():
        raise DatasetError(f"workspace dataset folder is a symbolic link: {dataset_dir}")
    if dataset_dir.exists():
        shutil.rmtree(dataset_dir)
    dataset_dir.mkdir(parents=True)

    images = list(dict.fromkeys(i for split in plan.splits.values() for i in split.images))
    folders = _Folders(dataset_dir)
    linked = copied = 0
    missing: set[str] = set()
    unreadable: set[str] = set()
    for image in images:
        _check(stop)
        src = plan.root / image
        if plan.confine is not None and not plan.confine.allows(src):
            raise DatasetError(f"image {image[:200]} leads outside the dataset folders through a symlink")
        result = _place(src, folders.ready(dataset_dir / image, "image"))
        if result == "missing":
            missing.add(image)
        elif result == "unreadable":
            unreadable.add(image)
        elif result == "linked":
            linked += 1
        else:
            copied += 1
    if missing:
        log.bind(missing=len(missing), first=sorted(missing)[0]).warning("listed images not found; skipped")
    if unreadable:
        log.bind(unreadable=len(unreadable), first=sorted(unreadable)[0][:200]).warning(
            "files that are not images (no known image header); skipped"
        )
    dropped_images = missing | unreadable
    images = [i for i in images if i not in dropped_images]
    if not images:
        raise DatasetError(
            f"no readable images: {len(missing)} listed images are missing and {len(unreadable)} are not "
            f"images (no known image header): {plan.source}"
        )

    present = _present_labels(plan, {label_for(image) for image in images})
    if not present:
        raise DatasetError(
            f"no labels found: none of the {len(images)} images has a label file "
            f"(labels/…/name.txt for images/…/name.jpg): {plan.source}"
        )
    chosen: Task = task if task is not None else _infer(plan, present, stop)
    stats = LabelStats()
    examples: list[str] = []
    for label in sorted(present):
        _check(stop)
        stats.add(_write_label(plan, label, folders, chosen, examples))
    if stats.kept == 0:
        raise DatasetError(
            f"no labels found: {stats.files} label files hold no valid annotation "
            f"({stats.dropped} invalid lines dropped{': ' + examples[0] if examples else ''}): {plan.source}"
        )
    log.bind(task=chosen, inferred=task is None, **stats.as_dict()).debug("labels normalized")
    if examples:
        log.bind(examples=examples).warning("invalid label lines dropped")

    entries = _split_entries(plan, dataset_dir, dropped_images, log)
    yaml_path = dataset_dir / YAML_NAME
    doc = workspace_yaml(plan.spec, dataset_dir, entries)
    yaml_path.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), encoding="utf-8")

    summary = {
        "images": len(images),
        "labels": len(present),
        "instances": stats.kept,
        "converted": stats.converted,
        "clipped": stats.clipped,
        "dropped": stats.dropped,
        "empty_labels": stats.empty_files,
        "background": len(images) - len(present),
        "linked": linked,
        "copied": copied,
        "missing_images": len(missing),
        "unreadable_images": len(unreadable),
    }
    return Built(yaml_path, chosen, summary)


def _present_labels(plan: DatasetPlan, wanted: set[str]) -> set[str]:
    if plan.labels is not None:
        return wanted & plan.labels
    present = {label for label in wanted if (plan.root / label).is_file()}
    if plan.confine is not None:
        for label in sorted(present):
            if not plan.confine.allows(plan.root / label):
                raise DatasetError(
                    f"label {label[:200]} leads outside the dataset folders through a symbolic link"
                )
    return present


def _infer(plan: DatasetPlan, labels: set[str], stop: threading.Event | None) -> Task:
    boxes = polygons = 0
    for label in labels:
        _check(stop)
        for line in _read(plan.root / label).splitlines():
            shape = shape_of(line)
            boxes += shape == "box"
            polygons += shape == "polygon"
    return infer_task(boxes, polygons)


class _Folders:
    """Workspace folders, created and checked once each (no symlink out of the workspace on the way)."""

    def __init__(self, top: Path) -> None:
        self.top = top
        self.checked: set[Path] = {top}

    def ready(self, dest: Path, what: str) -> Path:
        parent = dest.parent
        if parent not in self.checked:
            ensure_inside(dest, self.top, what)
            parent.mkdir(parents=True, exist_ok=True)
            ensure_inside(dest, self.top, what)
            self.checked.add(parent)
        return dest


def _write_label(
    plan: DatasetPlan, label: str, folders: _Folders, task: Task, examples: list[str]
) -> LabelStats:
    result = normalize_text(_read(plan.root / label), task, plan.spec.nc)
    for drop in result.dropped[: _MAX_EXAMPLES - len(examples)]:
        # A downloaded file's content is never quoted: only where the line is and what is wrong.
        text = f": {drop.text[:100]}" if plan.echo else ""
        examples.append(f"{label[:200]}:{drop.line_no} {drop.reason}{text}")
    dest = folders.ready(folders.top / label, "label")
    if dest.is_symlink():
        raise DatasetError(f"label: {dest} is a symbolic link")
    dest.write_text(result.text, encoding="utf-8")
    return result.stats


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError as exc:
        raise DatasetError(f"cannot read label file {path}: {exc}") from exc


Placed = Literal["linked", "copied", "missing", "unreadable"]


def _place(src: Path, dest: Path) -> Placed:
    """Hard-link `src` to `dest`, or copy it; not at all when it is missing or not an image."""
    if dest.exists():
        return "linked"
    try:
        kind = _sniff(src)
        if kind is None:
            return "unreadable"
        if kind == "jpeg-truncated":
            # Ultralytics re-saves such JPEGs in place; a hard link would let it rewrite the user's file.
            shutil.copyfile(src, dest)
            return "copied"
        os.link(src, dest)
        return "linked"
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        if exc.errno not in _LINK_FALLBACK:
            raise DatasetError(f"cannot place image {src} in the workspace: {exc.strerror}") from exc
    try:
        shutil.copyfile(src, dest)
    except OSError as exc:
        raise DatasetError(f"cannot copy image {src} into the workspace: {exc.strerror}") from exc
    return "copied"


# Leading bytes of the formats ultralytics reads (IMG_FORMATS): anything else is not an image.
_SIGNATURES = (
    b"\x89PNG\r\n\x1a\n",
    b"BM",
    b"II*\x00",  # TIFF, DNG
    b"MM\x00*",
    b"PF\n",  # PFM
    b"Pf\n",
    b"\x00\x00\x00\x0cjP  ",  # JPEG 2000
    b"\xffO\xffQ",
)


def _sniff(path: Path) -> Literal["jpeg", "jpeg-truncated", "other"] | None:
    """The image kind from the file's first bytes; None when it is no image format at all."""
    with path.open("rb") as handle:
        head = handle.read(16)
        if head.startswith(b"\xff\xd8\xff"):
            handle.seek(-2, os.SEEK_END)
            return "jpeg" if handle.read(2) == b"\xff\xd9" else "jpeg-truncated"
    if head.startswith(_SIGNATURES):
        return "other"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "other"
    if head[4:8] == b"ftyp":  # HEIC, AVIF
        return "other"
    return None


def _split_entries(plan: DatasetPlan, dataset_dir: Path, dropped: set[str], log: Logger) -> dict[str, str]:
    entries: dict[str, str] = {}
    for name, split in plan.splits.items():
        images = [i for i in split.images if i not in dropped]
        if not images:
            if name == "test":
                log.warning("test split has no images; left out")
                continue
            raise DatasetError(f"dataset YAML '{name}' has no readable images: {plan.source}")
        if split.directory is not None:
            entries[name] = split.directory or "."
            continue
        # Ultralytics reads absolute lines as they are; `./` lines would tie the list to one folder.
        lists = dataset_dir / SPLIT_LISTS
        lists.mkdir(exist_ok=True)
        (lists / f"{name}.txt").write_text("".join(f"{dataset_dir / i}\n" for i in images), encoding="utf-8")
        entries[name] = f"{SPLIT_LISTS}/{name}.txt"
    return entries


def _check(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise DatasetError("dataset preparation was interrupted")
