"""Fixtures for dataset tests: tiny dataset trees, a snapshot of a folder, and a real HTTP server."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import pytest
import yaml
from aiohttp import web

from agent.datasets import DatasetPreparer, RetryPolicy, SourcePolicy
from agent.domain.request import TrainingRequest, parse_request
from agent.domain.run import RunRow
from agent.domain.status import RunStatus

# Starts like a JPEG and ends with its end-of-image marker; preparation never decodes images.
JPEG = b"\xff\xd8\xff\xe0" + bytes(range(64)) + b"\xff\xd9"


def jpeg(tag: str) -> bytes:
    """A distinct, complete JPEG-looking file."""
    return JPEG[:-2] + tag.encode() + JPEG[-2:]


FAST_RETRY = RetryPolicy(attempts=4, initial=0.005, maximum=0.02)
# Local paths anywhere and dataset servers on this host's loopback (the tests' own HTTP servers).
LOOSE = SourcePolicy(confine_local=False, allow_private_urls=True)


def loose(dataset_root: Path) -> SourcePolicy:
    """As the embedded backend with DATASET_ROOT set, test servers on 127.0.0.1 allowed."""
    return SourcePolicy(roots=(dataset_root,), confine_local=False, allow_private_urls=True)


Listing = Literal["nginx", "json", "none"]


def request(data_yaml: str, task: str | None = None) -> TrainingRequest:
    config: dict[str, Any] = {"task": task} if task else {}
    return parse_request(RunRow(id="r1", status=RunStatus.QUEUED, data_yaml=data_yaml, configuration=config))


def write_tree(root: Path, files: Mapping[str, bytes | str]) -> None:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content)
        else:
            path.write_bytes(content)


def data_yaml(**doc: Any) -> str:
    doc.setdefault("names", ["cat", "dog"])
    return yaml.safe_dump(doc, sort_keys=False)


def basic_dataset(root: Path, **yaml_doc: Any) -> Path:
    """Detect-style dataset: two train images (a box, a polygon), one val image, one background image."""
    yaml_doc.setdefault("train", "images/train")
    yaml_doc.setdefault("val", "images/val")
    write_tree(
        root,
        {
            "images/train/a.jpg": JPEG,
            "images/train/b.jpg": jpeg("b"),
            "images/train/background.jpg": jpeg("bg"),
            "images/val/c.jpg": jpeg("c"),
            "labels/train/a.txt": "0 0.5 0.5 0.2 0.2\n",
            "labels/train/b.txt": "1 0.1 0.1 0.4 0.1 0.4 0.5\n",
            "labels/val/c.txt": "1 0.3 0.3 0.2 0.4\n",
            "data.yaml": data_yaml(**yaml_doc),
        },
    )
    return root / "data.yaml"


def snapshot(root: Path) -> dict[str, tuple[bytes | None, int]]:
    """Bytes and mtime of every file, and mtime of every folder, under `root`."""
    result: dict[str, tuple[bytes | None, int]] = {}
    for folder, _dirs, files in os.walk(root):
        rel = os.path.relpath(folder, root)
        result[rel + "/"] = (None, os.stat(folder).st_mtime_ns)
        for name in files:
            path = Path(folder) / name
            result[os.path.join(rel, name)] = (path.read_bytes(), path.stat().st_mtime_ns)
    return result


@pytest.fixture
def preparer_for(tmp_path: Path) -> Callable[..., DatasetPreparer]:
    def make(dataset_root: Path | None = None, concurrency: int = 4, **kwargs: Any) -> DatasetPreparer:
        kwargs.setdefault("retry", FAST_RETRY)
        # As on the embedded backend, and with the test servers on 127.0.0.1 allowed explicitly.
        kwargs.setdefault("policy", LOOSE if dataset_root is None else loose(dataset_root))
        return DatasetPreparer(dataset_root, tmp_path / "cache", concurrency, **kwargs)

    return make


@dataclass
class DatasetServer:
    """Serves a folder over real HTTP with directory listings, counts requests, injects faults."""

    root: Path
    listing: Listing = "nginx"
    requests: Counter[str] = field(default_factory=Counter)
    fail: dict[str, list[int]] = field(default_factory=dict)  # path → statuses to answer first
    truncate: Counter[str] = field(default_factory=Counter)  # path → times to send a short body
    wrong_size: dict[str, int] = field(default_factory=dict)  # path → size the JSON listing claims
    url: str = ""

    def file_requests(self) -> int:
        """GETs of images and labels (not the YAML, lists, manifest or folder listings)."""
        return sum(
            n
            for p, n in self.requests.items()
            if not p.endswith("/") and ("/images/" in p or "/labels/" in p)
        )

    async def handle(self, req: web.Request) -> web.StreamResponse:
        path = req.path
        self.requests[path] += 1
        if self.fail.get(path):
            status = self.fail[path].pop(0)
            return web.Response(status=status, headers={"Retry-After": "0"} if status == 429 else None)
        target = (self.root / path.lstrip("/")).resolve()
        if not target.is_relative_to(self.root.resolve()):
            return web.Response(status=403)
        if target.is_dir():
            if not path.endswith("/"):
                raise web.HTTPMovedPermanently(quote(path) + "/")
            return self._listing(path, target)
        if not target.is_file():
            return web.Response(status=404, text="not found")
        body = target.read_bytes()
        if self.truncate[path]:
            self.truncate[path] -= 1
            resp = web.StreamResponse(headers={"Content-Length": str(len(body) + 10)})
            resp.force_close()
            await resp.prepare(req)
            await resp.write(body)
            return resp
        return web.Response(body=body, content_type="application/octet-stream")

    def _listing(self, path: str, folder: Path) -> web.Response:
        if self.listing == "none":
            return web.Response(status=403, text="listing forbidden")
        children = sorted(folder.iterdir())
        if self.listing == "json":
            items = [
                {
                    "name": c.name,
                    "type": "directory" if c.is_dir() else "file",
                    "size": self.wrong_size.get(f"{path}{c.name}", c.stat().st_size),
                }
                for c in children
            ]
            return web.json_response(items)
        rows = ['<a href="../">../</a>']
        for c in children:
            name = c.name + ("/" if c.is_dir() else "")
            rows.append(f'<a href="{quote(name)}">{escape(name)}</a>          27-Nov-2026 03:15    -')
        html = (
            f"<html><head><title>Index of {escape(path)}</title></head><body>"
            f"<h1>Index of {escape(path)}</h1><hr><pre>" + "\n".join(rows) + "</pre><hr></body></html>"
        )
        return web.Response(text=html, content_type="text/html")


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Any]]:
    runners: list[web.AppRunner] = []

    async def start(root: Path, listing: Listing = "nginx") -> DatasetServer:
        server = DatasetServer(root, listing)
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", server.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        server.url = f"http://127.0.0.1:{port}"
        return server

    yield start
    for runner in runners:
        await runner.cleanup()
