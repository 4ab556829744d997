"""The datasets' trust boundary: what a row may point the agent at, and what it may not."""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from loguru import logger

from agent.datasets import DatasetPreparer, DiskSpace, SourcePolicy
from agent.datasets.cache import LOCK_NAME, USAGE_NAME, cache_entries, evict
from agent.datasets.netguard import AddressGuard, AddressRefused, GuardedTransport, IPAddress, refusal
from agent.datasets.spec import load_spec
from agent.domain.errors import DatasetError
from tests.datasets.conftest import FAST_RETRY, DatasetServer, basic_dataset, request, snapshot, write_tree

Preparers = Callable[..., DatasetPreparer]
Serve = Callable[..., Any]


def strict(tmp_path: Path, *roots: Path, **kwargs: Any) -> DatasetPreparer:
    """The preparer as the supabase and postgres backends build it."""
    policy = SourcePolicy(roots=roots, **kwargs)
    return DatasetPreparer(
        roots[0] if roots else None, tmp_path / "cache", 4, retry=FAST_RETRY, policy=policy
    )


# Local paths -------------------------------------------------------------------------------------


async def test_local_paths_need_a_root_on_the_confined_backends(tmp_path: Path) -> None:
    yaml_path = basic_dataset(tmp_path / "proj")
    with pytest.raises(DatasetError) as err:
        await strict(tmp_path).prepare(request(str(yaml_path)), "r", tmp_path / "ws")
    assert "DATASET_ROOT" in str(err.value) and "ALLOWED_DATASET_ROOTS" in str(err.value)
    assert not (tmp_path / "ws" / "dataset").exists()


async def test_absolute_and_relative_paths_under_a_root_work(tmp_path: Path) -> None:
    root = tmp_path / "datasets"
    yaml_path = basic_dataset(root / "proj")
    preparer = strict(tmp_path, root)
    await preparer.prepare(request(str(yaml_path)), "r", tmp_path / "ws1")
    await preparer.prepare(request("proj/data.yaml"), "r", tmp_path / "ws2")
    other = tmp_path / "more"
    second = basic_dataset(other / "p2")
    await strict(tmp_path, root, other).prepare(request(str(second)), "r", tmp_path / "ws3")
    assert (tmp_path / "ws3" / "dataset" / "labels" / "train" / "a.txt").is_file()


@pytest.mark.parametrize("how", ["absolute", "file-url", "traversal"])
async def test_paths_outside_the_roots_are_refused(tmp_path: Path, how: str) -> None:
    root = tmp_path / "datasets"
    root.mkdir()
    outside = basic_dataset(tmp_path / "home" / "user")
    data_yaml = {
        "absolute": str(outside),
        "file-url": f"file://{outside}",
        "traversal": f"{root}/../home/user/data.yaml",
    }[how]
    with pytest.raises(DatasetError, match="outside the dataset folders"):
        await strict(tmp_path, root).prepare(request(data_yaml), "r", tmp_path / "ws")


async def test_a_yaml_symlinked_from_inside_the_root_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "datasets"
    outside = basic_dataset(tmp_path / "private")
    (root / "proj").mkdir(parents=True)
    (root / "proj" / "data.yaml").symlink_to(outside)
    with pytest.raises(DatasetError, match="outside the dataset folders"):
        await strict(tmp_path, root).prepare(request("proj/data.yaml"), "r", tmp_path / "ws")


@pytest.mark.parametrize("what", ["split-folder", "image", "label", "root-folder", "yaml-path"])
async def test_symlinks_out_of_the_root_are_refused(tmp_path: Path, what: str) -> None:
    root = tmp_path / "datasets"
    private = tmp_path / "private"
    basic_dataset(private / "photos")
    yaml_path = basic_dataset(root / "proj")
    if what == "split-folder":
        (root / "proj" / "images" / "more").symlink_to(private / "photos" / "images" / "train")
        write_tree(root / "proj", {"data.yaml": "train: images/more\nval: images/val\nnames: [a, b]\n"})
    elif what == "image":
        os.unlink(root / "proj" / "images" / "train" / "a.jpg")
        (root / "proj" / "images" / "train" / "a.jpg").symlink_to(
            private / "photos" / "images" / "val" / "c.jpg"
        )
    elif what == "label":
        secret = private / "passwords.txt"
        secret.write_text("0 0.5 0.5 0.1 0.1\n")
        os.unlink(root / "proj" / "labels" / "train" / "a.txt")
        (root / "proj" / "labels" / "train" / "a.txt").symlink_to(secret)
    elif what == "root-folder":
        (root / "proj" / "linked").symlink_to(private / "photos")
        write_tree(
            root / "proj",
            {"data.yaml": "path: linked\ntrain: images/train\nval: images/val\nnames: [a, b]\n"},
        )
    else:
        write_tree(
            root / "proj",
            {
                "data.yaml": f"path: {private / 'photos'}\n"
                "train: images/train\nval: images/val\nnames: [a, b]\n"
            },
        )
    before = snapshot(tmp_path / "private")
    with pytest.raises(DatasetError, match="outside the dataset fold"):
        await strict(tmp_path, root).prepare(request(str(yaml_path)), "r", tmp_path / "ws")
    assert snapshot(tmp_path / "private") == before
    if what != "yaml-path":
        # The same dataset is fine where local paths are free (the embedded backend without a root).
        free = DatasetPreparer(None, tmp_path / "cache", 4, policy=SourcePolicy(confine_local=False))
        await free.prepare(request(str(yaml_path)), "r", tmp_path / "ws-free")


@pytest.mark.parametrize("train", ["/etc", "../../../../etc", "../outside/images"])
async def test_split_paths_may_not_leave_the_dataset(tmp_path: Path, train: str) -> None:
    root = tmp_path / "datasets"
    basic_dataset(tmp_path / "datasets" / "outside")
    yaml_path = basic_dataset(root / "proj", train=train)
    with pytest.raises(DatasetError, match=r"outside the dataset folder|not found"):
        await strict(tmp_path, root).prepare(request(str(yaml_path)), "r", tmp_path / "ws")


@pytest.mark.parametrize(
    "data_yaml",
    [
        "ftp://example.org/d/data.yaml",
        "gopher://example.org/1",
        "data:text/plain,train: x",
        "dict://h:11211/",
    ],
)
async def test_other_schemes_are_refused(tmp_path: Path, data_yaml: str) -> None:
    with pytest.raises(DatasetError, match="unsupported dataset URL scheme"):
        await strict(tmp_path, tmp_path).prepare(request(data_yaml), "r", tmp_path / "ws")


# Remote sources ----------------------------------------------------------------------------------


async def test_a_name_resolving_to_loopback_is_refused_without_the_flag(tmp_path: Path, serve: Serve) -> None:
    basic_dataset(tmp_path / "site" / "proj")
    server: DatasetServer = await serve(tmp_path / "site")
    url = server.url.replace("127.0.0.1", "localhost") + "/proj/data.yaml"
    with pytest.raises(DatasetError, match="loopback address") as err:
        await strict(tmp_path).prepare(request(url), "r", tmp_path / "ws")
    assert "ALLOW_PRIVATE_DATASET_URLS" in str(err.value)
    assert sum(server.requests.values()) == 0
    await strict(tmp_path, allow_private_urls=True).prepare(request(url), "r", tmp_path / "ws")
    assert server.requests["/proj/data.yaml"] == 1


@pytest.mark.parametrize(
    "target",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://[::ffff:169.254.169.254]/",
        "file:///etc/passwd",
    ],
)
async def test_redirects_are_checked_at_every_hop(tmp_path: Path, target: str) -> None:
    hops: list[str] = []

    async def redirect(req: web.Request) -> web.StreamResponse:
        hops.append(req.path)
        raise web.HTTPFound(target)

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", redirect)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/proj/data.yaml"
        # Private addresses allowed: the first hop is fine, the metadata endpoint never is.
        with pytest.raises(DatasetError, match=r"metadata address|unsupported scheme") as err:
            await strict(tmp_path, allow_private_urls=True).prepare(request(url), "r", tmp_path / "ws")
    finally:
        await runner.cleanup()
    # Each request got the redirect and no further: the YAML (and the manifest probe beside it).
    assert "/proj/data.yaml" in hops and len(str(err.value)) < 400


async def test_redirect_to_a_private_address_from_a_public_one() -> None:
    seen: list[httpx.URL] = []

    def far_end(req: httpx.Request) -> httpx.Response:
        seen.append(req.url)
        return httpx.Response(302, headers={"location": "http://10.0.0.5/admin"})

    # The public server is out of reach here: httpx's own in-process transport answers for it.
    transport = GuardedTransport(httpx.MockTransport(far_end), AddressGuard(False))
    async with httpx.AsyncClient(transport=transport) as client:
        first = await client.get("http://93.184.216.34/d/data.yaml")
        assert first.status_code == 302
        with pytest.raises(AddressRefused, match=r"10\.0\.0\.5 is a private address"):
            await client.get(first.headers["location"])
    assert [u.host for u in seen] == ["93.184.216.34"]


async def test_each_host_is_pinned_to_the_address_it_was_vetted_with() -> None:
    answers = [[ipaddress.ip_address("93.184.216.34")], [ipaddress.ip_address("127.0.0.1")]]
    seen: list[tuple[str, str]] = []

    async def rebinding_dns(host: str, port: int) -> list[IPAddress]:
        return answers.pop(0) if len(answers) > 1 else answers[0]

    def far_end(req: httpx.Request) -> httpx.Response:
        seen.append((req.url.host, req.headers["host"]))
        return httpx.Response(200, text="ok")

    transport = GuardedTransport(httpx.MockTransport(far_end), AddressGuard(False), resolver=rebinding_dns)
    async with httpx.AsyncClient(transport=transport) as client:
        for _ in range(3):
            await client.get("http://datasets.example.org/d/data.yaml")
    assert seen == [("93.184.216.34", "datasets.example.org")] * 3

    async def split_answer(host: str, port: int) -> list[IPAddress]:
        return [ipaddress.ip_address("93.184.216.34"), ipaddress.ip_address("192.168.1.10")]

    transport = GuardedTransport(httpx.MockTransport(far_end), AddressGuard(False), resolver=split_answer)
    async with httpx.AsyncClient(transport=transport) as client:
        with pytest.raises(AddressRefused, match=r"192\.168\.1\.10"):
            await client.get("http://mixed.example.org/d/data.yaml")


@pytest.mark.parametrize(
    ("address", "refused"),
    [
        ("127.0.0.1", True),
        ("10.1.2.3", True),
        ("172.16.0.1", True),
        ("192.168.0.1", True),
        ("169.254.169.254", True),
        ("100.100.100.200", True),
        ("224.0.0.1", True),
        ("0.0.0.0", True),
        ("::1", True),
        ("fe80::1", True),
        ("fd00:ec2::254", True),
        ("::ffff:10.0.0.1", True),
        ("8.8.8.8", False),
        ("2606:4700:4700::1111", False),
    ],
)
def test_address_classes(address: str, refused: bool) -> None:
    assert (refusal(ipaddress.ip_address(address), False) is not None) is refused
    metadata = address in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
    assert (refusal(ipaddress.ip_address(address), True) is not None) is metadata


async def test_unresolvable_hosts_and_closed_ports_fail_the_run(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="cannot resolve host"):
        await strict(tmp_path).prepare(request("https://nowhere.invalid/d/data.yaml"), "r", tmp_path / "ws")
    closed = strict(tmp_path, allow_private_urls=True)
    with pytest.raises(DatasetError, match="download failed"):
        await closed.prepare(request("http://127.0.0.1:9/d/data.yaml"), "r", tmp_path / "ws")


@pytest.mark.parametrize(
    "data_yaml",
    [
        "storage:private/p/data.yaml",
        "https://proj.supabase.co/storage/v1/object/public/secrets/p/data.yaml",
        "https://proj.supabase.co/storage/v1/object/sign/avatars/p/data.yaml?token=abc",
    ],
)
async def test_buckets_other_than_the_dataset_buckets_are_refused(tmp_path: Path, data_yaml: str) -> None:
    opened: list[object] = []
    policy = SourcePolicy(buckets=("datasets", "shared"), storage_host="proj.supabase.co")
    preparer = DatasetPreparer(
        None,
        tmp_path / "cache",
        4,
        sources={"storage": opened.append},
        policy=policy,  # type: ignore[dict-item]
    )
    with pytest.raises(DatasetError, match="is not a dataset bucket") as err:
        await preparer.prepare(request(data_yaml), "r", tmp_path / "ws")
    assert opened == [] and "token" not in str(err.value)


async def test_other_urls_on_the_supabase_host_are_refused(tmp_path: Path) -> None:
    policy = SourcePolicy(storage_host="proj.supabase.co")
    preparer = DatasetPreparer(None, tmp_path / "cache", 4, policy=policy)
    with pytest.raises(DatasetError, match="not a Storage object URL"):
        await preparer.prepare(request("https://proj.supabase.co/rest/v1/data.yaml"), "r", tmp_path / "ws")


async def test_fetched_content_is_never_quoted(tmp_path: Path, serve: Serve) -> None:
    secret = "AKIA-SECRET-VALUE"
    src = tmp_path / "site" / "proj"
    basic_dataset(src)
    write_tree(src, {"data.yaml": f"train: images/train\nval: images/val\nnc: {secret}\nnames: [a]\n"})
    server = await serve(tmp_path / "site")
    with pytest.raises(DatasetError, match=r"'nc' must be a positive integer up to \d+, not a str") as err:
        await strict(tmp_path, allow_private_urls=True).prepare(
            request(f"{server.url}/proj/data.yaml"), "r", tmp_path / "ws"
        )
    assert secret not in str(err.value)
    write_tree(src, {"data.yaml": "train: images/train\nval: images/val\nnames: [a, b]\n"})
    write_tree(src, {"labels/train/a.txt": f"{secret}\n", "labels/train/b.txt": "", "labels/val/c.txt": ""})
    with pytest.raises(DatasetError, match="no labels found") as err:
        await strict(tmp_path, allow_private_urls=True).prepare(
            request(f"{server.url}/proj/data.yaml"), "r", tmp_path / "ws"
        )
    assert secret not in str(err.value)


# Dataset YAML ------------------------------------------------------------------------------------

BILLION_LAUGHS = "a: &a ['lol','lol','lol','lol','lol','lol','lol','lol','lol']\n" + "".join(
    f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n"
    for p, c in zip("abcdefgh", "bcdefghi", strict=True)
)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (BILLION_LAUGHS, "anchors"),
        ("train: !!python/object/apply:os.system ['id']\nval: v\nnames: [a]\n", "tags are not accepted"),
        ("train: !custom x\nval: v\nnames: [a]\n", "tags are not accepted"),
        ("names: !!binary aGVsbG8=\n", "tags are not accepted"),
        ("train: " + "[" * 5000 + "]" * 5000 + "\n", "nesting depth|nested deeper"),
        ("train: " + "[" * 40 + "]" * 40 + "\n", "nested deeper than 32"),
        ("names: [" + ",".join(["x"] * 300_000) + "]\n", "more than"),
        ("train: " + "x" * (2 * 1024 * 1024) + "\n", "too large"),
        ("train: a\nval: b\nnames: [a]\nwhen: 2020-13-45\n", "value that cannot be read"),
        ("train: a\nval: b\nnc: 99999999999999999999999\n", "'nc' must be a positive integer up to"),
    ],
)
def test_hostile_yaml_is_refused_quickly_with_a_short_message(text: str, problem: str) -> None:
    started = time.monotonic()
    with pytest.raises(DatasetError, match=problem) as err:
        load_spec(text, "https://example.org/d/data.yaml")
    assert time.monotonic() - started < 5
    assert len(str(err.value)) < 400


def test_messages_quote_at_most_200_characters() -> None:
    with pytest.raises(DatasetError) as err:
        load_spec("train: images\nval: images\nnc: '" + "x" * 5000 + "'\nnames: [a]\n", "/d/data.yaml")
    assert len(str(err.value)) < 320


# Cache and disk ----------------------------------------------------------------------------------


def fake_entry(root: Path, name: str, size: int, used_at: float) -> Path:
    folder = root / name
    write_tree(folder, {"files/a.bin": b"x" * size})
    (folder / USAGE_NAME).write_text(json.dumps({"bytes": size, "used_at": used_at}))
    return folder


def test_cache_eviction_is_least_recently_used_first_and_skips_entries_in_use(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    oldest = fake_entry(root, "http-1", 100, 1000)
    locked = fake_entry(root, "http-2", 100, 1001)
    linked = fake_entry(root, "http-3", 100, 1002)
    newer = fake_entry(root, "http-4", 100, 1003)
    newest = fake_entry(root, "http-5", 100, 1004)
    assert [e.dir for e in cache_entries(root)] == [oldest, locked, linked, newer, newest]
    # A run building its workspace holds the lock; a run training holds hard links to the files.
    fd = os.open(locked / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    (tmp_path / "ws").mkdir()
    os.link(linked / "files" / "a.bin", tmp_path / "ws" / "a.bin")
    try:
        removed = evict(root, lambda total: total <= 300, logger)
    finally:
        os.close(fd)
    assert removed == 200
    assert not (oldest / "files").exists() and not (newer / "files").exists()
    assert (locked / "files" / "a.bin").exists() and (linked / "files" / "a.bin").exists()
    assert (newest / "files" / "a.bin").exists()


async def test_the_cache_cap_evicts_older_datasets_after_a_sync(tmp_path: Path, serve: Serve) -> None:
    for name in ("one", "two", "three"):
        basic_dataset(tmp_path / "site" / name)
    server = await serve(tmp_path / "site")
    preparer = strict(tmp_path, allow_private_urls=True)
    preparer.cache_max_bytes = 1  # smaller than any dataset: only the one just used stays
    for name in ("one", "two", "three"):
        await preparer.prepare(request(f"{server.url}/{name}/data.yaml"), "r", tmp_path / f"ws-{name}")
        # The run is over: its workspace (and its hard links to the cache) are gone.
        shutil.rmtree(tmp_path / f"ws-{name}")
    kept = [e for e in cache_entries(tmp_path / "cache") if e.bytes > 0]
    assert len(kept) == 1 and "three" in (kept[0].dir / "source.txt").read_text()


async def test_short_disk_fails_before_download_and_before_training(tmp_path: Path, serve: Serve) -> None:
    basic_dataset(tmp_path / "site" / "proj")
    server = await serve(tmp_path / "site")
    huge = DiskSpace(min_free=1 << 60)
    preparer = strict(tmp_path, allow_private_urls=True)
    preparer.disk = huge
    with pytest.raises(DatasetError, match="not enough free disk space to download the dataset") as err:
        await preparer.prepare(request(f"{server.url}/proj/data.yaml"), "r", tmp_path / "ws")
    assert "MIN_FREE_DISK_GB" in str(err.value) and server.file_requests() == 0
    local = basic_dataset(tmp_path / "datasets" / "p")
    preparer = strict(tmp_path, tmp_path / "datasets")
    preparer.disk = huge
    with pytest.raises(DatasetError, match="not enough free disk space to train"):
        await preparer.prepare(request(str(local)), "r", tmp_path / "ws")


async def test_files_that_are_not_images_are_skipped_and_a_dataset_of_none_fails(tmp_path: Path) -> None:
    root = tmp_path / "datasets"
    yaml_path = basic_dataset(root / "proj")
    write_tree(root / "proj", {"images/train/b.jpg": b"<?php system($_GET['c']); ?>"})
    prepared = await strict(tmp_path, root).prepare(request(str(yaml_path)), "r", tmp_path / "ws")
    assert prepared.summary["unreadable_images"] == 1
    assert not (tmp_path / "ws" / "dataset" / "images" / "train" / "b.jpg").exists()
    for image in ("images/train/a.jpg", "images/train/background.jpg", "images/val/c.jpg"):
        write_tree(root / "proj", {image: b"\x00" * 64})
    with pytest.raises(DatasetError, match="no readable images"):
        await strict(tmp_path, root).prepare(request(str(yaml_path)), "r", tmp_path / "ws")


async def test_a_path_with_a_nul_byte_fails_the_run_cleanly(tmp_path: Path) -> None:
    root = tmp_path / "datasets"
    yaml_path = basic_dataset(root / "proj", path="sub\x00dir")
    with pytest.raises(DatasetError, match=r"invalid path or value|invalid characters"):
        await strict(tmp_path, root).prepare(request(str(yaml_path)), "r", tmp_path / "ws")
