"""The extension point for other remote sources (Supabase Storage), driven by a folder-backed fake."""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.datasets import (
    DatasetPreparer,
    HttpRef,
    RemoteFile,
    RemoteNotFound,
    RemoteSource,
    RemoteTransient,
    StorageRef,
)
from agent.domain.errors import DatasetError
from tests.datasets.conftest import basic_dataset, request

Preparers = Callable[..., DatasetPreparer]


class FolderSource:
    """A bucket as a folder: what a Storage source does, minus the network."""

    def __init__(self, bucket_dir: Path, ref: StorageRef, flaky: int = 0) -> None:
        self.root = bucket_dir / ref.folder
        self.ref = ref
        self.flaky = Counter[str]()
        self.flaky_each = flaky
        self.fetched = Counter[str]()
        self.closed = False

    @property
    def cache_key(self) -> str:
        return "storage:test/" + self.ref.bucket + "/" + self.ref.path

    def describe(self, path: str) -> str:
        return f"storage:{self.ref.bucket}/{self.ref.folder}/{path}"

    async def list_files(self, prefix: str) -> list[RemoteFile]:
        top = self.root / prefix
        if not top.is_dir():
            return []
        return [
            RemoteFile(p.relative_to(self.root).as_posix(), p.stat().st_size)
            for p in sorted(top.rglob("*"))
            if p.is_file()
        ]

    async def fetch(self, path: str, dest: Path) -> int:
        self.fetched[path] += 1
        if self.flaky[path] < self.flaky_each:
            self.flaky[path] += 1
            raise RemoteTransient("HTTP 503")
        src = self.root / path
        if not src.is_file():
            raise RemoteNotFound(f"not found: {path}")
        shutil.copyfile(src, dest)
        return src.stat().st_size

    async def aclose(self) -> None:
        self.closed = True


async def test_storage_reference_without_a_registered_source(tmp_path: Path, preparer_for: Preparers) -> None:
    with pytest.raises(DatasetError, match="storage datasets need the supabase backend"):
        await preparer_for().prepare(request("storage:datasets/p/data.yaml"), "r", tmp_path / "ws")


@pytest.mark.parametrize(
    "data_yaml",
    [
        "storage:datasets/p/data.yaml",
        "https://abc.supabase.co/storage/v1/object/sign/datasets/p/data.yaml?token=t",
        "https://abc.supabase.co/storage/v1/object/public/datasets/p/data.yaml",
    ],
)
async def test_registered_storage_source(tmp_path: Path, preparer_for: Preparers, data_yaml: str) -> None:
    basic_dataset(tmp_path / "bucket" / "p")
    sources: list[FolderSource] = []

    def factory(ref: HttpRef | StorageRef) -> RemoteSource:
        assert isinstance(ref, StorageRef)
        source = FolderSource(tmp_path / "bucket", ref, flaky=1)
        sources.append(source)
        return source

    preparer = preparer_for(sources={"storage": factory})
    prepared = await preparer.prepare(request(data_yaml), "r", tmp_path / "ws")
    assert prepared.summary["images"] == 4
    assert (tmp_path / "ws/dataset/labels/train/b.txt").read_text() == "1 0.25 0.3 0.3 0.4\n"
    assert sources[0].closed
    assert sources[0].fetched["images/train/a.jpg"] == 2  # one transient failure, retried

    await preparer.prepare(request(data_yaml), "r2", tmp_path / "ws2")
    assert not any(sources[1].fetched[p] for p in sources[1].fetched if p.startswith(("images/", "labels/")))
