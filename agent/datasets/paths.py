"""Path safety: every path named by a YAML, a list file, a listing or a manifest stays inside its folder."""

from __future__ import annotations

import os
import posixpath
import re
from pathlib import Path

from agent.domain.errors import DatasetError

_DRIVE = re.compile(r"^[A-Za-z]:")
_CONTROL = re.compile(r"[\x00-\x1f]")


def _short(text: str, limit: int = 200) -> str:
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


def join_rel(base: str, raw: str, what: str, *, echo: bool = True) -> str:
    """`raw` joined to relative folder `base`, normalized; DatasetError when absolute or climbing out.

    `echo`: quote `raw` in the message (off for lines of downloaded files).
    """
    text = raw.strip()
    shown = f" {_short(text)}" if echo else ""
    if not text:
        raise DatasetError(f"{what}: empty path")
    if _CONTROL.search(text) or "\\" in text:
        raise DatasetError(f"{what}: invalid characters in path{shown}")
    if text.startswith("/") or _DRIVE.match(text):
        raise DatasetError(
            f"{what}: absolute path{shown} is not allowed here; use a path relative to the dataset"
        )
    joined = posixpath.normpath(posixpath.join(base, text)) if base else posixpath.normpath(text)
    if joined == ".." or joined.startswith("../"):
        raise DatasetError(f"{what}: path{shown} points outside the dataset folder")
    return "" if joined == "." else joined


def escapes(base: str, raw: str) -> bool:
    """True when relative `raw` joined to `base` climbs out of it (lexically)."""
    joined = posixpath.normpath(posixpath.join(base, raw)) if base else posixpath.normpath(raw)
    return joined == ".." or joined.startswith("../")


def is_within(path: Path, root: Path) -> bool:
    """Lexical containment of two absolute paths (no filesystem access)."""
    p, r = os.path.normpath(path), os.path.normpath(root)
    return p == r or p.startswith(r.rstrip(os.sep) + os.sep)


def real_within(path: Path, root: Path) -> bool:
    """Containment after resolving symlinks on both sides."""
    return is_within(Path(os.path.realpath(path)), Path(os.path.realpath(root)))


def ensure_inside(dest: Path, top: Path, what: str) -> None:
    """Refuse to write `dest` when it, or a symlink on its way, leads out of `top`."""
    if not is_within(dest, top):
        raise DatasetError(f"{what}: {dest} is outside {top}")
    probe = dest
    while not probe.exists() and not probe.is_symlink() and probe != top:
        probe = probe.parent
    if probe.is_symlink() or not real_within(probe, top):
        raise DatasetError(f"{what}: {dest} leads outside {top} through a symbolic link")


class Confinement:
    """Whether files resolve, symlinks followed, inside allowed folders; resolved folders are cached."""

    def __init__(self, real_roots: tuple[str, ...]) -> None:
        self._roots = real_roots
        self._dirs: dict[str, str] = {}

    def allows(self, path: Path | str) -> bool:
        parent, name = os.path.split(os.fspath(path))
        real_parent = self._dirs.get(parent)
        if real_parent is None:
            real_parent = self._dirs[parent] = os.path.realpath(parent)
        full = os.path.join(real_parent, name)
        if os.path.islink(full):
            full = os.path.realpath(full)
        return any(is_within(Path(full), Path(root)) for root in self._roots)

    def folder_allows(self, folder: Path | str) -> bool:
        real = os.path.realpath(folder)
        return any(is_within(Path(real), Path(root)) for root in self._roots)
