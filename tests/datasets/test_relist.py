"""relist_after: a recent listing of a complete cache is reused while the dataset YAML is unchanged."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.datasets import DatasetPreparer
from tests.datasets.conftest import DatasetServer, basic_dataset, data_yaml, jpeg, request, write_tree

Preparers = Callable[..., DatasetPreparer]
Serve = Callable[..., Any]


def listings(server: DatasetServer) -> int:
    return sum(n for path, n in server.requests.items() if path.endswith("/"))


def marker(tmp_path: Path) -> Path:
    return next((tmp_path / "cache").glob("http-*/complete.json"))


async def first_sync(tmp_path: Path, preparer_for: Preparers, serve: Serve) -> tuple[DatasetServer, str]:
    basic_dataset(tmp_path / "site" / "proj")
    server: DatasetServer = await serve(tmp_path / "site")
    url = f"{server.url}/proj/data.yaml"
    await preparer_for(relist_after=300).prepare(request(url), "r1", tmp_path / "ws1")
    assert listings(server) > 0
    server.requests.clear()
    return server, url


async def test_recent_listing_and_same_yaml_skip_the_listings(
    tmp_path: Path, preparer_for: Preparers, serve: Serve
) -> None:
    server, url = await first_sync(tmp_path, preparer_for, serve)
    # Added after the listing: not seen while the listing is trusted.
    write_tree(tmp_path / "site" / "proj", {"images/train/new.jpg": jpeg("new")})

    prepared = await preparer_for(relist_after=300).prepare(request(url), "r2", tmp_path / "ws2")

    assert dict(server.requests) == {"/proj/data.yaml": 1}  # no listing, no manifest probe
    assert prepared.summary["images"] == 4
    assert prepared.summary["downloaded"] == 1
    assert prepared.summary["cached"] == 7
    assert prepared.summary["offline_reuse"] == 0
    ds = tmp_path / "ws2" / "dataset"
    assert (ds / "images/train/b.jpg").read_bytes() == jpeg("b")
    assert (ds / "labels/train/b.txt").exists()
    assert not (ds / "labels/train/background.txt").exists()


async def test_by_default_every_sync_lists(tmp_path: Path, preparer_for: Preparers, serve: Serve) -> None:
    server, url = await first_sync(tmp_path, preparer_for, serve)
    await preparer_for().prepare(request(url), "r2", tmp_path / "ws2")
    assert listings(server) > 0


async def test_changed_yaml_lists_again(tmp_path: Path, preparer_for: Preparers, serve: Serve) -> None:
    server, url = await first_sync(tmp_path, preparer_for, serve)
    src = tmp_path / "site" / "proj"
    write_tree(src, {"images/train/new.jpg": jpeg("new"), "labels/train/new.txt": "0 0.5 0.5 0.3 0.3\n"})
    write_tree(src, {"data.yaml": data_yaml(train="images/train", val="images/val", names=["cat", "cow"])})

    prepared = await preparer_for(relist_after=300).prepare(request(url), "r2", tmp_path / "ws2")

    assert listings(server) > 0
    assert prepared.summary["images"] == 5
    assert server.file_requests() == 2


async def test_old_listing_lists_again(tmp_path: Path, preparer_for: Preparers, serve: Serve) -> None:
    server, url = await first_sync(tmp_path, preparer_for, serve)
    content = json.loads(marker(tmp_path).read_text())
    content["listed_at"] -= 301
    marker(tmp_path).write_text(json.dumps(content))
    write_tree(tmp_path / "site" / "proj", {"images/train/new.jpg": jpeg("new")})

    prepared = await preparer_for(relist_after=300).prepare(request(url), "r2", tmp_path / "ws2")

    assert listings(server) > 0
    assert prepared.summary["images"] == 5
    # The new listing is trusted from now on.
    assert json.loads(marker(tmp_path).read_text())["listed_at"] > content["listed_at"] + 300
    server.requests.clear()
    await preparer_for(relist_after=300).prepare(request(url), "r3", tmp_path / "ws3")
    assert listings(server) == 0


async def test_incomplete_cache_lists_again(tmp_path: Path, preparer_for: Preparers, serve: Serve) -> None:
    server, url = await first_sync(tmp_path, preparer_for, serve)
    (marker(tmp_path).parent / "files" / "images/train/a.jpg").unlink()

    prepared = await preparer_for(relist_after=300).prepare(request(url), "r2", tmp_path / "ws2")

    assert listings(server) > 0
    assert server.requests["/proj/images/train/a.jpg"] == 1
    assert prepared.summary["images"] == 4


def test_relist_after_must_not_be_negative(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="relist_after"):
        DatasetPreparer(None, tmp_path / "cache", relist_after=-1)
