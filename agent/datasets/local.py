"""Local datasets: a YAML on this host, read in place (never written).

Where the data may be: the dataset root is the YAML's `path:` (relative to the YAML's folder; absent:
the YAML's folder). That root must lie within the YAML's folder or DATASET_ROOT, after resolving
symlinks; otherwise the run fails. One exception keeps datasets written for the old trainer working:
an absolute `path:` that does not exist on this host (the machine that exported the dataset) is
ignored with a warning and the YAML's folder is used, as the old trainer did. Every split entry and
list line must stay inside the dataset root. Symlinks inside the user's dataset are followed: the
workspace receives hard links or copies of their targets, never a symlink.
"""

from __future__ import annotations

import os
import posixpath
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from loguru import logger

from agent.datasets.paths import Confinement, is_within, real_within
from agent.datasets.policy import ROOT_SETTINGS, SourcePolicy
from agent.datasets.spec import (
    DatasetPlan,
    DatasetSpec,
    SplitPlan,
    is_image,
    list_entry,
    list_lines,
    load_spec,
    split_entry,
)
from agent.domain.errors import DatasetError

if TYPE_CHECKING:
    from loguru import Logger

_FOREIGN_ABSOLUTE = re.compile(r"^([A-Za-z]:[\\/]|\\\\)")


def plan_local(
    yaml_path: Path,
    dataset_root: Path | None,
    log: Logger = logger,
    stop: threading.Event | None = None,
    policy: SourcePolicy | None = None,
) -> DatasetPlan:
    """Read the YAML and enumerate every split's images; DatasetError on anything unusable.

    With a confining `policy`, the YAML, the dataset root and every file read must resolve, symlinks
    followed, inside the policy's folders.
    """
    confine = Confinement(policy.real_roots) if policy is not None and policy.confine_local else None
    if policy is not None:
        policy.check_local_yaml(yaml_path, str(yaml_path))
    if not yaml_path.is_file():
        if yaml_path.is_dir():
            raise DatasetError(f"dataset YAML is a folder, not a file: {yaml_path}")
        raise DatasetError(f"dataset YAML not found: {yaml_path}")
    try:
        text = yaml_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"dataset YAML cannot be read ({exc}): {yaml_path}") from exc
    spec = load_spec(text, str(yaml_path))
    root = _root(spec, yaml_path, dataset_root, log, confine)
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root} (from {yaml_path})")
    splits = {name: _split(root, name, entries, stop, confine) for name, entries in spec.splits.items()}
    return DatasetPlan(
        root=root, spec=spec, splits=splits, labels=None, source=str(yaml_path), confine=confine
    )


def _root(
    spec: DatasetSpec, yaml_path: Path, dataset_root: Path | None, log: Logger, confine: Confinement | None
) -> Path:
    folder = Path(os.path.normpath(yaml_path.absolute().parent))
    if spec.path is None:
        return folder
    allowed = [folder] + ([dataset_root] if dataset_root is not None else [])
    if _FOREIGN_ABSOLUTE.match(spec.path):
        _stale_path(spec.path, yaml_path, log)
        return folder
    candidate = Path(os.path.normpath(folder / spec.path))
    if confine is not None:
        # Confined: wherever it is written, the root must resolve inside an allowed folder.
        if confine.folder_allows(candidate):
            return candidate
    # Lexically inside (a symlinked folder of the user's) or inside once resolved (a symlinked root).
    elif any(is_within(candidate, a) or real_within(candidate, a) for a in allowed):
        return candidate
    if Path(spec.path).is_absolute() and not candidate.exists():
        _stale_path(spec.path, yaml_path, log)
        return folder
    where = ROOT_SETTINGS if confine is not None else " or ".join(str(a) for a in allowed)
    raise DatasetError(
        f"dataset YAML 'path: {spec.path[:200]}' points outside the dataset folder ({where}); "
        f"remove it or make it relative to the YAML: {yaml_path}"
    )


def _stale_path(path: str, yaml_path: Path, log: Logger) -> None:
    log.bind(path=path, yaml=str(yaml_path)).warning(
        "dataset YAML 'path' does not exist on this host; using the YAML's folder"
    )


def _split(
    root: Path, name: str, entries: list[str], stop: threading.Event | None, confine: Confinement | None
) -> SplitPlan:
    images: list[str] = []
    folders: list[str] = []
    for entry in entries:
        what = f"dataset YAML '{name}: {entry[:200]}'"
        rel = _entry_rel(root, entry, what)
        target = root / rel if rel else root
        if confine is not None and target.exists() and not confine.allows(target):
            raise DatasetError(
                f"{what}: leads outside the dataset folders ({ROOT_SETTINGS}) through a symbolic link"
            )
        if target.is_dir():
            folders.append(rel)
            images.extend(_walk_images(root, rel, stop, confine, what))
        elif target.is_file() and rel.endswith(".txt"):
            images.extend(_read_list(root, rel, what, confine))
        elif target.is_file() and is_image(rel):
            images.append(rel)
        else:
            raise DatasetError(f"{what}: not found under {root}")
    if not images:
        shown = ", ".join(e[:200] for e in entries[:5])
        raise DatasetError(f"dataset YAML '{name}' has no images: {shown} under {root}")
    directory = folders[0] if len(entries) == 1 and folders else None
    return SplitPlan(images=tuple(dict.fromkeys(images)), directory=directory)


def _entry_rel(root: Path, entry: str, what: str) -> str:
    if Path(entry).is_absolute():
        absolute = Path(os.path.normpath(entry))
        if not is_within(absolute, root):
            raise DatasetError(f"{what}: points outside the dataset folder {root}")
        rel = absolute.relative_to(root).as_posix()
        return "" if rel == "." else rel
    return split_entry("", entry, what, exists=lambda rel: (root / rel).exists())


def _walk_images(
    root: Path, rel: str, stop: threading.Event | None, confine: Confinement | None, what: str
) -> list[str]:
    found: list[str] = []
    top = root / rel if rel else root
    visited: set[tuple[int, int]] = set()
    for folder, dirs, files in os.walk(top, followlinks=True):
        if stop is not None and stop.is_set():
            raise DatasetError("dataset preparation was interrupted")
        if confine is not None and not confine.folder_allows(folder):
            raise DatasetError(
                f"{what}: {Path(folder).relative_to(root).as_posix()[:200]} leads outside the dataset "
                f"folders ({ROOT_SETTINGS}) through a symbolic link"
            )
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in visited:
            # A symlink loop: this folder was walked already.
            dirs.clear()
            continue
        visited.add((st.st_dev, st.st_ino))
        dirs.sort()
        prefix = Path(folder).relative_to(root).as_posix()
        for file in sorted(files):
            if is_image(file):
                found.append(file if prefix == "." else f"{prefix}/{file}")
    return found


def _read_list(root: Path, rel: str, what: str, confine: Confinement | None) -> list[str]:
    try:
        text = (root / rel).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{what}: cannot read list file ({exc})") from exc
    folder = posixpath.dirname(rel)
    images: list[str] = []
    for n, line in enumerate(list_lines(text), 1):
        if not is_image(line):
            continue
        if Path(line).is_absolute():
            images.append(_entry_rel(root, line, f"{what} line {n}"))
        else:
            images.append(list_entry(folder, line, f"{what} line {n}"))
    return images
