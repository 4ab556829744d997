from __future__ import annotations

import asyncio
import functools
import http.server
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.datasets import DatasetPreparer
from agent.datasets.http import parse_html_listing, parse_json_listing
from agent.domain.errors import DatasetError
from tests.datasets.conftest import DatasetServer, basic_dataset, data_yaml, jpeg, request, write_tree

Preparers = Callable[..., DatasetPreparer]
Serve = Callable[..., Any]


def same_tree_as_local(ws: Path) -> None:
    ds = ws / "dataset"
    assert (ds / "images/train/b.jpg").read_bytes() == jpeg("b")
    assert (ds / "labels/train/b.txt").read_text() == "1 0.25 0.3 0.3 0.4\n"
    assert not (ds / "labels/train/background.txt").exists()
    assert yaml.safe_load((ds / "data.yaml").read_text())["path"] == str(ds)


@pytest.mark.parametrize("listing", ["nginx", "json"])
async def test_dataset_from_directory_listings(
    tmp_path: Path, preparer_for: Preparers, serve: Serve, listing: str
) -> None:
    basic_dataset(tmp_path / "site" / "sets" / "proj")
    server: DatasetServer = await serve(tmp_path / "site", listing)
    prepared = await preparer_for().prepare(
        request(f"{server.url}/sets/proj/data.yaml"), "r", tmp_path / "ws"
    )
    same_tree_as_local(tmp_path / "ws")
    assert prepared.task == "detect"
    assert prepared.summary["images"] == 4
    assert prepared.summary["downloaded"] == 4 + 3 + 1  # images, labels, the YAML
    assert server.requests["/sets/proj/labels/train/background.txt"] == 0  # the listing said it is absent


async def test_nested_folders_and_odd_names(tmp_path: Path, preparer_for: Preparers, serve: Serve) -> None:
    src = tmp_path / "site" / "p"
    write_tree(
        src,
        {
            "images/train/day 1/a #1.jpg": jpeg("a"),
            "images/train/day 1/deeper/b.jpg": jpeg("b"),
            "labels/train/day 1/a #1.txt": "0 0.5 0.5 0.1 0.1\n",
            "labels/train/day 1/deeper/b.txt": "0 0.5 0.5 0.1 0.1\n",
            "images/val/c.jpg": jpeg("c"),
            "labels/val/c.txt": "0 0.5 0.5 0.1 0.1\n",
            "data.yaml": data_yaml(train="images/train", val="images/val"),
        },
    )
    server = await serve(tmp_path / "site")
    prepared = await preparer_for().prepare(request(f"{server.url}/p/data.yaml"), "r", tmp_path / "ws")
    ds = tmp_path / "ws" / "dataset"
    assert (ds / "images/train/day 1/a #1.jpg").read_bytes() == jpeg("a")
    assert (ds / "labels/train/day 1/deeper/b.txt").exists()
    assert prepared.summary["instances"] == 3


async def test_python_http_server_listings(tmp_path: Path, preparer_for: Preparers) -> None:
    basic_dataset(tmp_path / "site" / "proj")
    with python_http_server(tmp_path / "site") as url:
        await preparer_for().prepare(request(f"{url}/proj/data.yaml"), "r", tmp_path / "ws")
    same_tree_as_local(tmp_path / "ws")


async def test_txt_lists_without_listings(tmp_path: Path, preparer_for: Preparers, serve: Serve) -> None:
    src = tmp_path / "site" / "proj"
    basic_dataset(src, train="train.txt", val="val.txt")
    write_tree(
        src,
        {
            "train.txt": "./images/train/a.jpg\n./images/train/b.jpg\nimages/train/background.jpg\n",
            "val.txt": "./images/val/c.jpg\n",
        },
    )
    server = await serve(tmp_path / "site", "none")
    prepared = await preparer_for().prepare(request(f"{server.url}/proj/data.yaml"), "r", tmp_path / "ws")
    same_tree_as_local(tmp_path / "ws")
    assert prepared.summary["background"] == 1
    # Probed: a 404 there means a background image.
    assert server.requests["/proj/labels/train/background.txt"] == 1

    # The second run knows the label is absent and that everything else is cached.
    server.requests.clear()
    await preparer_for().prepare(request(f"{server.url}/proj/data.yaml"), "r", tmp_path / "ws2")
    assert server.file_requests() == 0


async def test_manifest_beside_the_yaml(tmp_path: Path, preparer_for: Preparers, serve: Serve) -> None:
    src = tmp_path / "site" / "proj"
    basic_dataset(src)
    files = sorted(
        p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file() and p.suffix != ".yaml"
    )
    write_tree(src, {"manifest.txt": "# every file\n" + "\n".join(files) + "\n"})
    server = await serve(tmp_path / "site", "none")
    prepared = await preparer_for().prepare(request(f"{server.url}/proj/data.yaml"), "r", tmp_path / "ws")
    same_tree_as_local(tmp_path / "ws")
    assert prepared.summary["images"] == 4
    assert not any(p.endswith("/") for p in server.requests)  # no folder was listed


async def test_manifest_with_txt_lists(tmp_path: Path, preparer_for: Preparers, serve: Serve) -> None:
    src = tmp_path / "site" / "proj"
    basic_dataset(src, train="train.txt")
    write_tree(
        src,
        {
            "train.txt": "./images/train/a.jpg\n./images/train/b.jpg\n./images/train/background.jpg\n",
            "manifest.txt": "images/val/c.jpg\nlabels/val/c.txt\nlabels/train/a.txt\nlabels/train/b.txt\n",
        },
    )
    server = await serve(tmp_path / "site", "none")
    prepared = await preparer_for().prepare(request(f"{server.url}/proj/data.yaml"), "r", tmp_path / "ws")
    same_tree_as_local(tmp_path / "ws")
    assert prepared.summary["labels"] == 3
    assert server.requests["/proj/labels/train/background.txt"] == 0  # the manifest is the whole truth


async def test_no_way_to_find_files(tmp_path: Path, preparer_for: Preparers, serve: Serve) -> None:
    basic_dataset(tmp_path / "site" / "proj")
    server = await serve(tmp_path / "site", "none")
    with pytest.raises(DatasetError, match=r"cannot list .*/proj/images/train/.*manifest\.txt"):
        await preparer_for().prepare(request(f"{server.url}/proj/data.yaml"), "r", tmp_path / "ws")


async def test_transient_failures_are_retried(tmp_path: Path, preparer_for: Preparers, serve: Serve) -> None:
    basic_dataset(tmp_path / "site" / "proj")
    server = await serve(tmp_path / "site")
    server.fail = {
        "/proj/data.yaml": [503, 502],
        "/proj/images/train/": [500],
        "/proj/images/train/a.jpg": [503, 429, 504],
        "/proj/labels/train/b.txt": [500],
    }
    server.truncate["/proj/images/val/c.jpg"] = 1
    prepared = await preparer_for().prepare(request(f"{server.url}/proj/data.yaml"), "r", tmp_path / "ws")
    same_tree_as_local(tmp_path / "ws")
    assert (tmp_path / "ws/dataset/images/val/c.jpg").read_bytes() == jpeg("c")
    assert server.requests["/proj/images/train/a.jpg"] == 4
    assert server.requests["/proj/images/val/c.jpg"] == 2
    assert prepared.summary["images"] == 4


async def test_transient_failures_that_persist(tmp_path: Path, preparer_for: Preparers, serve: Serve) -> None:
    basic_dataset(tmp_path / "site" / "proj")
    server = await serve(tmp_path / "site")
    server.fail["/proj/images/val/c.jpg"] = [503] * 10
    with pytest.raises(
        DatasetError, match=r"download failed after 4 attempts: .*/proj/images/val/c\.jpg: HTTP 503"
    ):
        await preparer_for().prepare(request(f"{server.url}/proj/data.yaml"), "r", tmp_path / "ws")
    assert server.requests["/proj/images/val/c.jpg"] == 4


async def test_size_mismatch_with_the_listing_is_retried_then_fails(
    tmp_path: Path, preparer_for: Preparers, serve: Serve
) -> None:
    basic_dataset(tmp_path / "site" / "proj")
    server = await serve(tmp_path / "site", "json")
    server.wrong_size["/proj/images/train/a.jpg"] = 999
    with pytest.raises(DatasetError, match="size mismatch: listed as 999 bytes"):
        await preparer_for().prepare(request(f"{server.url}/proj/data.yaml"), "r", tmp_path / "ws")
    assert server.requests["/proj/images/train/a.jpg"] == 4
    leftovers = [p for p in (tmp_path / "cache").rglob("*") if p.name.endswith(".part")]
    assert leftovers == []


async def test_permanent_404(tmp_path: Path, preparer_for: Preparers, serve: Serve) -> None:
    src = tmp_path / "site" / "proj"
    basic_dataset(src, train="train.txt")
    write_tree(src, {"train.txt": "./images/train/a.jpg\n./images/train/missing.jpg\n"})
    server = await serve(tmp_path / "site")
    with pytest.raises(
        DatasetError, match=r"dataset file not found: http://.*/proj/images/train/missing\.jpg"
    ):
        await preparer_for().prepare(request(f"{server.url}/proj/data.yaml"), "r", tmp_path / "ws")
    assert server.requests["/proj/images/train/missing.jpg"] == 1  # a 404 is not retried


async def test_missing_remote_yaml(tmp_path: Path, preparer_for: Preparers, serve: Serve) -> None:
    (tmp_path / "site").mkdir()
    server = await serve(tmp_path / "site")
    with pytest.raises(DatasetError, match=r"dataset YAML not found: http://.*/nope/data\.yaml"):
        await preparer_for().prepare(request(f"{server.url}/nope/data.yaml"), "r", tmp_path / "ws")


async def test_cache_is_reused(tmp_path: Path, preparer_for: Preparers, serve: Serve) -> None:
    basic_dataset(tmp_path / "site" / "proj")
    server = await serve(tmp_path / "site")
    url = f"{server.url}/proj/data.yaml"
    await preparer_for().prepare(request(url), "r1", tmp_path / "ws1")
    assert server.file_requests() == 7
    server.requests.clear()

    # A fresh token on the URL is the same source.
    second = await preparer_for().prepare(request(url + "?token=abc"), "r2", tmp_path / "ws2")
    assert server.file_requests() == 0
    assert second.summary["downloaded"] == 1  # the YAML, to notice a changed dataset
    assert second.summary["cached"] == 7
    same_tree_as_local(tmp_path / "ws2")
    cached = next((tmp_path / "cache").glob("http-*")) / "files" / "images/train/a.jpg"
    assert os.path.samefile(cached, tmp_path / "ws2/dataset/images/train/a.jpg")


async def test_grown_dataset_downloads_only_new_files(
    tmp_path: Path, preparer_for: Preparers, serve: Serve
) -> None:
    src = tmp_path / "site" / "proj"
    basic_dataset(src)
    server = await serve(tmp_path / "site")
    url = f"{server.url}/proj/data.yaml"
    await preparer_for().prepare(request(url), "r1", tmp_path / "ws1")
    write_tree(src, {"images/train/new.jpg": jpeg("new"), "labels/train/new.txt": "0 0.5 0.5 0.3 0.3\n"})
    server.requests.clear()
    prepared = await preparer_for().prepare(request(url), "r2", tmp_path / "ws2")
    assert server.file_requests() == 2
    assert prepared.summary["images"] == 5


async def test_partial_cache_is_resumed(tmp_path: Path, preparer_for: Preparers, serve: Serve) -> None:
    basic_dataset(tmp_path / "site" / "proj")
    server = await serve(tmp_path / "site")
    url = f"{server.url}/proj/data.yaml"
    server.fail["/proj/labels/val/c.txt"] = [403]  # fetched last: files are fetched in order, one at a time
    with pytest.raises(DatasetError, match="HTTP 403"):
        await preparer_for(concurrency=1).prepare(request(url), "r1", tmp_path / "ws1")
    assert not list((tmp_path / "cache").glob("*/complete.json"))
    assert server.file_requests() == 7
    server.requests.clear()
    await preparer_for().prepare(request(url), "r2", tmp_path / "ws2")
    same_tree_as_local(tmp_path / "ws2")
    assert server.file_requests() == 1
    assert server.requests["/proj/labels/val/c.txt"] == 1


async def test_unreachable_source_uses_a_complete_cache(
    tmp_path: Path, preparer_for: Preparers, serve: Serve
) -> None:
    basic_dataset(tmp_path / "site" / "proj")
    server = await serve(tmp_path / "site")
    url = f"{server.url}/proj/data.yaml"
    await preparer_for().prepare(request(url), "r1", tmp_path / "ws1")
    server.fail["/proj/data.yaml"] = [503] * 10
    prepared = await preparer_for().prepare(request(url), "r2", tmp_path / "ws2")
    same_tree_as_local(tmp_path / "ws2")
    assert prepared.summary["offline_reuse"] == 1

    server.requests.clear()
    offline = await preparer_for(offline=True).prepare(request(url), "r3", tmp_path / "ws3")
    assert sum(server.requests.values()) == 0
    assert offline.summary["images"] == 4


async def test_unreachable_source_without_a_cache(tmp_path: Path, preparer_for: Preparers) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there once closed
    with pytest.raises(
        DatasetError, match=rf"download failed after 4 attempts: http://127\.0\.0\.1:{port}/p/"
    ):
        await preparer_for().prepare(request(f"http://127.0.0.1:{port}/p/data.yaml"), "r", tmp_path / "ws")


async def test_concurrent_runs_share_one_download(
    tmp_path: Path, preparer_for: Preparers, serve: Serve
) -> None:
    basic_dataset(tmp_path / "site" / "proj")
    server = await serve(tmp_path / "site")
    url = f"{server.url}/proj/data.yaml"
    await asyncio.gather(
        *(preparer_for().prepare(request(url), f"r{i}", tmp_path / f"ws{i}") for i in range(3))
    )
    assert server.file_requests() == 7
    for i in range(3):
        same_tree_as_local(tmp_path / f"ws{i}")


@pytest.mark.parametrize("path", ["/etc", "../../x", ".."])
async def test_remote_yaml_path_outside_its_folder(
    tmp_path: Path, preparer_for: Preparers, serve: Serve, path: str
) -> None:
    basic_dataset(tmp_path / "site" / "a" / "proj", path=path)
    server = await serve(tmp_path / "site")
    with pytest.raises(DatasetError, match=r"'path: .*' points outside the dataset's folder"):
        await preparer_for().prepare(request(f"{server.url}/a/proj/data.yaml"), "r", tmp_path / "ws")


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"train.txt": "./images/train/a.jpg\n../../../etc/passwd.jpg\n"}, "outside the dataset folder"),
        ({"train.txt": "/etc/passwd.jpg\n"}, "absolute path"),
        ({"manifest.txt": "images/train/a.jpg\n../secret.jpg\n"}, "outside the dataset folder"),
    ],
)
async def test_remote_paths_may_not_escape(
    tmp_path: Path, preparer_for: Preparers, serve: Serve, files: dict[str, str], message: str
) -> None:
    src = tmp_path / "site" / "proj"
    basic_dataset(src, train="train.txt" if "train.txt" in files else "images/train")
    write_tree(src, files)
    server = await serve(tmp_path / "site")
    with pytest.raises(DatasetError, match=message):
        await preparer_for().prepare(request(f"{server.url}/proj/data.yaml"), "r", tmp_path / "ws")
    assert not (tmp_path / "etc").exists()


async def test_remote_dataset_with_empty_labels(
    tmp_path: Path, preparer_for: Preparers, serve: Serve
) -> None:
    src = tmp_path / "site" / "proj"
    basic_dataset(src)
    write_tree(src, {"labels/train/a.txt": "", "labels/train/b.txt": "\n", "labels/val/c.txt": ""})
    server = await serve(tmp_path / "site")
    with pytest.raises(DatasetError, match="no labels found"):
        await preparer_for().prepare(request(f"{server.url}/proj/data.yaml"), "r", tmp_path / "ws")


async def test_remote_task_inference(tmp_path: Path, preparer_for: Preparers, serve: Serve) -> None:
    src = tmp_path / "site" / "proj"
    basic_dataset(src)
    write_tree(
        src,
        {
            "labels/train/a.txt": "0 0.1 0.1 0.5 0.1 0.3 0.4\n",
            "labels/val/c.txt": "1 0.2 0.2 0.6 0.2 0.6 0.6\n",
        },
    )
    server = await serve(tmp_path / "site")
    prepared = await preparer_for().prepare(request(f"{server.url}/proj/data.yaml"), "r", tmp_path / "ws")
    assert prepared.task == "segment"


def test_parse_listings() -> None:
    python_server = (
        '<ul>\n<li><a href="a%20b.jpg">a b.jpg</a></li>\n<li><a href="sub/">sub/</a></li>\n'
        '<li><a href="link@">link@</a></li>\n</ul>'
    )
    entries = parse_html_listing(python_server, "http://h/x/images/")
    assert [(e.name, e.is_dir) for e in entries] == [("a b.jpg", False), ("sub", True), ("link@", False)]

    apache = (
        '<a href="?C=N;O=D">Name</a><a href="/x/">Parent Directory</a><a href="a.jpg">a.jpg</a>'
        '<a href="http://elsewhere/x/images/b.jpg">b</a><a href="/x/images/c.jpg">c</a>'
        '<a href="../images/d.jpg">d</a><a href="deep/e.jpg">e</a><a href="%2e%2e/">up</a>'
    )
    assert [e.name for e in parse_html_listing(apache, "http://h/x/images/")] == ["a.jpg", "c.jpg", "d.jpg"]

    nginx_json = '[{"name":"a.jpg","type":"file","size":12},{"name":"t","type":"directory"},{"name":".."}]'
    assert [(e.name, e.is_dir, e.size) for e in parse_json_listing(nginx_json)] == [
        ("a.jpg", False, 12),
        ("t", True, None),
    ]


@functools.cache
def _quiet_handler(directory: str) -> type[http.server.SimpleHTTPRequestHandler]:
    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=directory, **kwargs)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


class python_http_server:
    """`python -m http.server` in a thread, for its own listing format."""

    def __init__(self, root: Path) -> None:
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _quiet_handler(str(root)))
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()
