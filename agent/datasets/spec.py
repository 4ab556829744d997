"""The dataset YAML as ultralytics reads it, and the plan of files a workspace is built from."""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from agent.datasets.paths import Confinement, escapes, join_rel
from agent.datasets.policy import shorten
from agent.domain.errors import DatasetError

SPLITS = ("train", "val", "test")
REQUIRED_SPLITS = ("train", "val")
# Ultralytics' IMG_FORMATS.
IMAGE_SUFFIXES = frozenset(
    {
        ".bmp",
        ".dng",
        ".jpeg",
        ".jpg",
        ".mpo",
        ".png",
        ".tif",
        ".tiff",
        ".webp",
        ".pfm",
        ".heic",
        ".avif",
        ".jp2",
    }
)
# Keys dropped from the workspace copy: `download` is code or a URL ultralytics runs when data is missing.
DROPPED_KEYS = ("download", "minival")
# A dataset YAML names folders and classes: a few KB. These bound what an untrusted one may cost.
MAX_YAML_BYTES = 1024 * 1024
MAX_YAML_DEPTH = 32
MAX_YAML_NODES = 20_000
MAX_YAML_SCALAR = 64 * 1024
MAX_CLASSES = 10_000


@dataclass(frozen=True, slots=True)
class DatasetSpec:
    doc: dict[str, Any]
    path: str | None  # the YAML's `path:` as written
    splits: dict[str, list[str]]  # split → entries as written (a folder, a .txt list or an image each)
    nc: int


@dataclass(frozen=True, slots=True)
class SplitPlan:
    images: tuple[str, ...]  # POSIX paths relative to the plan's root
    directory: str | None  # the split was this one folder (relative to the root); None: a list


@dataclass(frozen=True, slots=True)
class DatasetPlan:
    """Everything the workspace builder needs, with no network and no YAML left to interpret."""

    root: Path  # local folder holding the files (the user's dataset, or the cache)
    spec: DatasetSpec
    splits: dict[str, SplitPlan]
    labels: frozenset[str] | None  # label files known to exist, relative to root; None: look on disk
    source: str  # for messages
    # Local datasets on a confined backend: every file read must resolve inside the allowed folders.
    confine: Confinement | None = None
    echo: bool = True  # quote file content (dropped label lines) in messages; off for downloads


class _Refused(yaml.YAMLError):
    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def parse_yaml(text: str) -> object:
    """A dataset YAML document through the safe loader, once its events passed the checks below.

    No aliases or anchors: they let a few hundred bytes expand into gigabytes ("billion laughs").
    No explicit tags: they ask for constructors a dataset YAML never needs. Depth, values and
    scalar lengths are bounded. The events are checked as they stream, so a hostile document
    costs at most MAX_YAML_NODES events before it is refused.
    """
    depth = nodes = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.AliasEvent):
            raise _Refused("aliases (*name) are not accepted")
        if isinstance(event, yaml.SequenceEndEvent | yaml.MappingEndEvent):
            depth -= 1
            continue
        if not isinstance(event, yaml.ScalarEvent | yaml.SequenceStartEvent | yaml.MappingStartEvent):
            continue
        if event.anchor is not None:
            raise _Refused("anchors (&name) are not accepted")
        if event.tag not in (None, "!"):
            raise _Refused(f"tags are not accepted ({str(event.tag)[:50]})")
        nodes += 1
        if nodes > MAX_YAML_NODES:
            raise _Refused(f"more than {MAX_YAML_NODES} values")
        if isinstance(event, yaml.ScalarEvent):
            if len(event.value) > MAX_YAML_SCALAR:
                raise _Refused(f"a value longer than {MAX_YAML_SCALAR} characters")
            continue
        depth += 1
        if depth > MAX_YAML_DEPTH:
            raise _Refused(f"nested deeper than {MAX_YAML_DEPTH} levels")
    return yaml.load(text, Loader=_Loader)  # a safe loader, its events checked above


def load_spec(text: str, where: str, *, echo: bool = True) -> DatasetSpec:
    """Parse and check a dataset YAML; every problem names the key.

    `echo`: quote offending values in messages (at most 200 characters). Off for downloaded YAMLs:
    whatever a server answered never reaches a message the web app shows.
    """
    if len(text) > MAX_YAML_BYTES:
        raise DatasetError(
            f"dataset YAML is too large ({len(text)} characters, at most {MAX_YAML_BYTES}): {where}"
        )
    try:
        doc = parse_yaml(text)
    except RecursionError as exc:
        raise DatasetError(f"dataset YAML is nested too deeply: {where}") from exc
    except yaml.YAMLError as exc:
        raise DatasetError(f"dataset YAML is not valid YAML ({_yaml_problem(exc)}): {where}") from exc
    except (ValueError, TypeError, OverflowError) as exc:
        # A scalar the safe loader resolves but cannot build (a date like 2020-13-45).
        raise DatasetError(
            f"dataset YAML holds a value that cannot be read ({type(exc).__name__}): {where}"
        ) from exc
    if not isinstance(doc, dict):
        raise DatasetError(f"dataset YAML must be a mapping of keys (train, val, names, …): {where}")
    doc = {str(k): v for k, v in doc.items()}

    def show(value: object) -> str:
        return shorten(value) if echo else f"a {type(value).__name__}"

    path = doc.get("path")
    if path is not None and not isinstance(path, str):
        raise DatasetError(f"dataset YAML key 'path' must be a string, not {show(path)}: {where}")
    splits: dict[str, list[str]] = {}
    for key in SPLITS:
        value = doc.get(key)
        if value is None or value == "" or value == []:
            if key in REQUIRED_SPLITS:
                raise DatasetError(f"dataset YAML has no '{key}' key: {where}")
            continue
        entries = value if isinstance(value, list) else [value]
        if not all(isinstance(e, str) and e.strip() for e in entries):
            raise DatasetError(
                f"dataset YAML key '{key}' must be a path or a list of paths, not {show(value)}: {where}"
            )
        splits[key] = [e.strip() for e in entries]
    return DatasetSpec(
        doc=doc, path=path.strip() if path else None, splits=splits, nc=_class_count(doc, where, show)
    )


def is_image(path: str) -> bool:
    return posixpath.splitext(path)[1].lower() in IMAGE_SUFFIXES


def label_for(image: str) -> str:
    """Ultralytics' rule: the last `/images/` becomes `/labels/`, the suffix `.txt`."""
    full = "/" + image
    head, sep, tail = full.rpartition("/images/")
    mapped = f"{head}/labels/{tail}" if sep else full
    return posixpath.splitext(mapped)[0][1:] + ".txt"


def labels_folder(folder: str) -> str | None:
    """The labels folder matching an images folder (`a/images/b` → `a/labels/b`), if it names one."""
    parts = folder.split("/") if folder else []
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            return "/".join([*parts[:i], "labels", *parts[i + 1 :]])
    return None


def split_entry(root: str, entry: str, what: str, exists: Callable[[str], bool] | None = None) -> str:
    """A split entry relative to the dataset root.

    Roboflow exports write `train: ../train/images` beside a YAML that sits in the dataset folder;
    ultralytics retries such entries without the `../`, and so do we when the path would climb out
    (or, given `exists`, is missing).
    """
    if entry.startswith("../"):
        stripped = entry[3:]
        missing = escapes(root, entry) or (exists is not None and not exists(join_rel(root, entry, what)))
        if missing and not escapes(root, stripped):
            return join_rel(root, stripped, what)
    return join_rel(root, entry, what)


def list_lines(text: str) -> list[str]:
    """Image paths of a split list file, one per line; blank lines and `#` comments skipped."""
    lines = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def list_entry(list_folder: str, line: str, what: str, *, echo: bool = True) -> str:
    """A list file line relative to the source: `./x` and `x` are both relative to the list's folder."""
    return join_rel(list_folder, line[2:] if line.startswith("./") else line, what, echo=echo)


def workspace_yaml(spec: DatasetSpec, dataset_dir: Path, splits: dict[str, str]) -> dict[str, Any]:
    """The YAML the trainer reads: `path` is the workspace, splits are relative inside it."""
    doc: dict[str, Any] = {"path": str(dataset_dir)}
    doc.update(splits)
    for key, value in spec.doc.items():
        if key in ("path", *SPLITS, *DROPPED_KEYS):
            continue
        doc[key] = value
    return doc


def _class_count(doc: dict[str, Any], where: str, show: Callable[[object], str]) -> int:
    names = doc.get("names")
    nc = doc.get("nc")
    if nc is not None and (isinstance(nc, bool) or not isinstance(nc, int) or not 1 <= nc <= MAX_CLASSES):
        raise DatasetError(
            f"dataset YAML key 'nc' must be a positive integer up to {MAX_CLASSES}, not {show(nc)}: {where}"
        )
    if names is None:
        if nc is None:
            raise DatasetError(f"dataset YAML has no 'names' key (nor 'nc'): {where}")
        return int(nc)
    if isinstance(names, list):
        count = len(names)
    elif isinstance(names, dict):
        try:
            ids = sorted(int(k) for k in names)
        except (TypeError, ValueError):
            raise DatasetError(f"dataset YAML key 'names' must map class ids to names: {where}") from None
        if ids != list(range(len(ids))):
            raise DatasetError(f"dataset YAML key 'names' must number classes 0..{len(ids) - 1}: {where}")
        count = len(ids)
    else:
        raise DatasetError(
            f"dataset YAML key 'names' must be a list or a mapping, not {show(names)}: {where}"
        )
    if count == 0:
        raise DatasetError(f"dataset YAML key 'names' is empty: {where}")
    if nc is not None and nc != count:
        raise DatasetError(f"dataset YAML key 'nc' is {nc} but 'names' has {count} entries: {where}")
    return count


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or type(exc).__name__
    return f"{problem} at line {mark.line + 1}" if mark is not None else str(problem)
