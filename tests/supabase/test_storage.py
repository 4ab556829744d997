"""Storage against the stand-in: artifacts with public and signed URLs, and datasets from buckets."""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import httpx
import pytest
import yaml

from agent.backends.supabase import StorageSource, SupabaseBackends, SupabaseBlobs, open_supabase
from agent.datasets import DatasetPreparer, RemoteNotFound, RemoteTransient, StorageRef, parse_dataset_ref
from agent.datasets.synthetic import make_dataset
from agent.domain.errors import BackendUnavailable, DatasetError
from agent.retry import transient
from tests.datasets.conftest import FAST_RETRY, request
from tests.standin import StandIn
from tests.supabase.harness import settings_for

KEY = "training_runs/r1/weights/best.pt"


async def fetch(url: str) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.get(url)


async def test_public_artifact_urls_serve_the_uploaded_bytes(supa: SupabaseBackends, tmp_path: Path) -> None:
    source = tmp_path / "best.pt"
    source.write_bytes(b"\x80weights" * 1000)
    url = await supa.blobs.upload(KEY, source, "application/octet-stream")
    assert url.startswith("http://")
    assert "/object/public/training-artifacts/training_runs/r1/weights/best.pt" in url
    response = await fetch(url)
    assert response.status_code == 200 and response.content == source.read_bytes()
    assert response.headers["content-type"].startswith("application/octet-stream")

    csv = tmp_path / "results.csv"
    csv.write_text("epoch,loss\n1,0.5\n")
    response = await fetch(await supa.blobs.upload("training_runs/r1/results.csv", csv, "text/csv"))
    assert response.headers["content-type"].startswith("text/csv")


async def test_signed_artifact_urls_serve_the_uploaded_bytes(standin: StandIn, tmp_path: Path) -> None:
    settings = settings_for(standin, tmp_path / "agent", artifact_url_mode="signed", signed_url_ttl=600)
    backends = await open_supabase(settings)
    try:
        source = tmp_path / "best.pt"
        source.write_bytes(hashlib.sha256(b"x").digest() * 4096)
        url = await backends.blobs.upload(KEY, source, "application/octet-stream")
        assert "/object/sign/" in url and "token=" in url
        response = await fetch(url)
        assert response.status_code == 200 and response.content == source.read_bytes()
        # The bucket is private: the object has no public URL.
        public = url.split("/object/sign/")[0] + "/object/public/training-artifacts/" + KEY
        assert (await fetch(public)).status_code >= 400
        dest = tmp_path / "back" / "best.pt"
        assert await backends.blobs.download(KEY, dest) and dest.read_bytes() == source.read_bytes()
    finally:
        await backends.close()


async def test_storage_5xx_bursts_are_retried_by_the_core(
    supa: SupabaseBackends, standin: StandIn, tmp_path: Path
) -> None:
    source = tmp_path / "last.pt"
    source.write_bytes(b"checkpoint")
    standin.faults.fail_next("storage", 1, status=503)
    with pytest.raises(BackendUnavailable):
        await supa.blobs.upload(KEY, source, "application/octet-stream")
    standin.faults.fail_next("storage", 3, status=502)
    await transient("upload", lambda: supa.blobs.upload(KEY, source, "application/octet-stream"), within=10)
    standin.faults.fail_next("storage", 2, status=500)
    dest = tmp_path / "back.pt"
    assert await transient("download", lambda: supa.blobs.download(KEY, dest), within=10)
    assert dest.read_bytes() == b"checkpoint"


async def test_a_missing_checkpoint_is_false(supa: SupabaseBackends, tmp_path: Path) -> None:
    assert await supa.blobs.download("training_runs/none/checkpoints/last.pt", tmp_path / "x.pt") is False
    assert not (tmp_path / "x.pt").exists()


# Datasets ---------------------------------------------------------------------------------------


async def upload_tree(blobs: SupabaseBlobs, bucket: str, root: Path, prefix: str) -> dict[str, bytes]:
    """Every file under `root` into `bucket` under `prefix`; returns their object names and bytes."""
    storage = blobs._storage
    with contextlib.suppress(Exception):  # already there
        await storage.create_bucket(bucket, options={"public": False})
    objects = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = f"{prefix}/{path.relative_to(root).as_posix()}"
        await storage.from_(bucket).upload(
            name, path, {"content-type": "application/octet-stream", "upsert": "true"}
        )
        objects[name] = path.read_bytes()
    return objects


def source_for(supa: SupabaseBackends, ref: str) -> StorageSource:
    parsed = parse_dataset_ref(ref, None)
    assert isinstance(parsed, StorageRef)
    source = supa.dataset_sources["storage"](parsed)
    assert isinstance(source, StorageSource)
    return source


async def test_listing_pages_through_nested_folders(supa: SupabaseBackends, tmp_path: Path) -> None:
    root = tmp_path / "ds"
    for i in range(7):
        (root / "images" / "train" / f"deep{i % 2}").mkdir(parents=True, exist_ok=True)
        (root / "images" / "train" / f"deep{i % 2}" / f"{i}.jpg").write_bytes(b"j" * (i + 1))
        (root / "labels" / "train").mkdir(parents=True, exist_ok=True)
        (root / "labels" / "train" / f"{i}.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    (root / "data.yaml").write_text("train: images/train\nnames: [a]\n")
    await upload_tree(supa.blobs, "datasets", root, "projects/p1")  # type: ignore[arg-type]

    source = source_for(supa, "storage:datasets/projects/p1/data.yaml")
    source._page_size = 2  # every folder takes several pages
    images = await source.list_files("images")
    assert [f.path for f in images] == sorted(f"images/train/deep{i % 2}/{i}.jpg" for i in range(7))
    assert {f.path: f.size for f in images}["images/train/deep0/4.jpg"] == 5
    assert len(await source.list_files("labels/train")) == 7
    assert await source.list_files("nothing-here") == []

    dest = tmp_path / "one.jpg"
    assert await source.fetch("images/train/deep1/3.jpg", dest) == 4 and dest.read_bytes() == b"jjjj"
    with pytest.raises(RemoteNotFound):
        await source.fetch("images/train/missing.jpg", dest)


async def test_fetch_classifies_server_errors_as_transient(
    supa: SupabaseBackends, standin: StandIn, tmp_path: Path
) -> None:
    root = tmp_path / "ds"
    root.mkdir()
    (root / "data.yaml").write_text("names: [a]\n")
    await upload_tree(supa.blobs, "datasets", root, "p2")  # type: ignore[arg-type]
    source = source_for(supa, "storage:datasets/p2/data.yaml")
    standin.faults.fail_next("storage", 1, status=503)
    with pytest.raises(RemoteTransient):
        await source.fetch("data.yaml", tmp_path / "y")
    standin.faults.fail_next("storage", 1, status=500)
    with pytest.raises(RemoteTransient):
        await source.list_files("")


@pytest.mark.parametrize("kind", ["uri", "authenticated", "signed", "signed-expired"])
async def test_a_storage_dataset_is_prepared_through_5xx_bursts(
    supa: SupabaseBackends, standin: StandIn, tmp_path: Path, kind: str
) -> None:
    yaml_path = make_dataset(tmp_path / "synthetic", "detect", train=6, val=2, imgsz=64)
    doc = yaml.safe_load(yaml_path.read_text())
    del doc["path"]  # a dataset in a bucket names its folders relative to the YAML
    yaml_path.write_text(yaml.safe_dump(doc))
    objects = await upload_tree(supa.blobs, "datasets", yaml_path.parent, "shapes")  # type: ignore[arg-type]
    storage = supa.blobs._storage  # type: ignore[attr-defined]
    if kind == "uri":
        ref = "storage:datasets/shapes/data.yaml"
    elif kind == "authenticated":
        ref = f"{standin.url}/storage/v1/object/authenticated/datasets/shapes/data.yaml"
    else:
        signed = await storage.from_("datasets").create_signed_url("shapes/data.yaml", 600)
        ref = signed["signedURL"]
        if kind == "signed-expired":
            # A token Storage refuses: the YAML is read with the service key instead.
            ref = ref.split("token=")[0] + "token=not-a-valid-token"
    preparer = DatasetPreparer(None, tmp_path / "cache", 4, sources=supa.dataset_sources, retry=FAST_RETRY)
    standin.faults.fail_next("storage", 3, status=503)
    prepared = await preparer.prepare(request(ref, task="detect"), "r1", tmp_path / "ws")
    assert prepared.task == "detect" and prepared.yaml_path.is_file()
    workspace_images = list((tmp_path / "ws").rglob("*.jpg"))
    assert len(workspace_images) == sum(name.endswith(".jpg") for name in objects) == 8


async def test_a_missing_storage_dataset_fails_clearly(supa: SupabaseBackends, tmp_path: Path) -> None:
    preparer = DatasetPreparer(None, tmp_path / "cache", 4, sources=supa.dataset_sources, retry=FAST_RETRY)
    with pytest.raises(DatasetError, match="not found"):
        await preparer.prepare(request("storage:datasets/nope/data.yaml"), "r1", tmp_path / "ws")


async def test_another_projects_storage_url_is_refused(supa: SupabaseBackends, tmp_path: Path) -> None:
    preparer = DatasetPreparer(None, tmp_path / "cache", 4, sources=supa.dataset_sources, retry=FAST_RETRY)
    ref = "https://other.supabase.co/storage/v1/object/public/datasets/shapes/data.yaml"
    with pytest.raises(DatasetError, match="not to this agent's project"):
        await preparer.prepare(request(ref), "r1", tmp_path / "ws")
