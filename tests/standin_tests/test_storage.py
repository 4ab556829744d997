"""The official `storage3` client (through `supabase`) against the stand-in."""

from __future__ import annotations

import time

import httpx
import pytest
from storage3.exceptions import StorageApiError
from supabase import AsyncClient, acreate_client

from tests.standin.auth import sign
from tests.standin.server import StandIn


@pytest.fixture
async def bucket(supabase: AsyncClient) -> str:
    await supabase.storage.create_bucket("datasets")
    return "datasets"


async def test_buckets(supabase: AsyncClient) -> None:
    assert await supabase.storage.create_bucket("artifacts", options={"public": True}) == {
        "name": "artifacts"
    }
    found = await supabase.storage.get_bucket("artifacts")
    assert (found.id, found.name, found.public, found.owner) == ("artifacts", "artifacts", True, "")
    assert [b.id for b in await supabase.storage.list_buckets()] == ["artifacts"]
    with pytest.raises(StorageApiError) as duplicate:
        await supabase.storage.create_bucket("artifacts")
    assert (duplicate.value.status, duplicate.value.code) == ("409", "Duplicate")
    with pytest.raises(StorageApiError) as missing:
        await supabase.storage.get_bucket("nope")
    assert missing.value.status == "404"


async def test_upload_download_upsert_info(supabase: AsyncClient, bucket: str) -> None:
    files = supabase.storage.from_(bucket)
    uploaded = await files.upload("a/data.yaml", b"names: [cat]\n", {"content-type": "application/x-yaml"})
    assert uploaded.path == "a/data.yaml" and uploaded.full_path == f"{bucket}/a/data.yaml"
    assert await files.download("a/data.yaml") == b"names: [cat]\n"
    with pytest.raises(StorageApiError) as duplicate:
        await files.upload("a/data.yaml", b"other")
    assert (duplicate.value.status, duplicate.value.code) == ("409", "Duplicate")
    await files.upload("a/data.yaml", b"v2", {"upsert": "true", "content-type": "text/yaml"})
    assert await files.download("a/data.yaml") == b"v2"
    await files.update("a/data.yaml", b"v3")
    info = await files.info("a/data.yaml")
    assert info["size"] == 2 and info["name"] == "a/data.yaml" and info["bucket_id"] == bucket
    assert await files.exists("a/data.yaml") and not await files.exists("a/nope.yaml")
    with pytest.raises(StorageApiError) as missing:
        await files.download("a/nope.yaml")
    assert (missing.value.status, missing.value.code) == ("404", "not_found")


async def test_list_folders_paging_and_metadata(supabase: AsyncClient, bucket: str) -> None:
    files = supabase.storage.from_(bucket)
    for split in ("train", "val"):
        for i in range(3):
            await files.upload(
                f"ds/images/{split}/{i}.jpg", bytes([i]) * (i + 1), {"content-type": "image/jpeg"}
            )
    await files.upload("ds/data.yaml", b"x")
    top = await files.list("ds")
    assert [(e["name"], e["id"] is None) for e in top] == [("data.yaml", False), ("images", True)]
    assert top[1]["metadata"] is None
    assert [e["name"] for e in await files.list("ds/images/")] == ["train", "val"]
    first = await files.list("ds/images/train", {"limit": 2, "offset": 0})
    rest = await files.list("ds/images/train", {"limit": 2, "offset": 2})
    assert [e["name"] for e in first + rest] == ["0.jpg", "1.jpg", "2.jpg"]
    assert first[1]["metadata"]["size"] == 2 and first[1]["metadata"]["mimetype"] == "image/jpeg"
    assert [e["name"] for e in await files.list("ds/images/val", {"search": "2"})] == ["2.jpg"]
    removed = await files.remove(["ds/images/val/0.jpg", "ds/nope"])
    assert [r["name"] for r in removed] == ["ds/images/val/0.jpg"]
    assert [e["name"] for e in await files.list("ds/images/val")] == ["1.jpg", "2.jpg"]


async def test_signed_and_public_urls(supabase: AsyncClient, standin: StandIn, bucket: str) -> None:
    files = supabase.storage.from_(bucket)
    content = bytes(range(256)) * 10
    await files.upload("weights/best.pt", content, {"content-type": "application/octet-stream"})
    signed = await files.create_signed_url("weights/best.pt", 60)
    async with httpx.AsyncClient() as http:
        response = await http.get(signed["signedURL"])
        assert response.status_code == 200 and response.content == content
        assert response.headers["content-type"] == "application/octet-stream"
        tampered = await http.get(signed["signedURL"].replace("best.pt", "last.pt"))
        assert tampered.status_code == 400
        expired = sign(standin.jwt_secret, {"url": f"{bucket}/weights/best.pt"}, -10)
        late = await http.get(
            f"{standin.url}/storage/v1/object/sign/{bucket}/weights/best.pt?token={expired}"
        )
        assert late.status_code == 400 and late.json()["error"] == "InvalidJWT"
        private = await http.get(await files.get_public_url("weights/best.pt"))
        assert private.status_code == 400 and private.json()["statusCode"] == "404"
        await supabase.storage.update_bucket(bucket, {"public": True})
        public = await http.get(await files.get_public_url("weights/best.pt"))
        assert public.status_code == 200 and public.content == content
        head = await http.head(await files.get_public_url("weights/best.pt"))
        assert head.status_code == 200 and head.headers["content-length"] == str(len(content))
        auth = {"Authorization": f"Bearer {standin.service_role_key}"}
        authed = await http.get(
            f"{standin.url}/storage/v1/object/authenticated/{bucket}/weights/best.pt", headers=auth
        )
        assert authed.content == content
        ranged = await http.get(signed["signedURL"], headers={"Range": "bytes=0-9"})
        assert ranged.status_code == 206 and ranged.content == content[:10]
    many = await files.create_signed_urls(["weights/best.pt", "nope"], 60)
    assert many[0]["signedURL"] and many[1]["error"]


async def test_faults_and_rls(supabase: AsyncClient, standin: StandIn, bucket: str) -> None:
    files = supabase.storage.from_(bucket)
    await files.upload("x.txt", b"x")
    standin.faults.fail_next("storage", 1)
    with pytest.raises(StorageApiError) as failed:
        await files.download("x.txt")
    assert failed.value.status == "503"
    assert await files.download("x.txt") == b"x"
    standin.faults.latency("storage", 0.1)
    started = time.monotonic()
    await files.download("x.txt")
    assert time.monotonic() - started >= 0.1
    standin.faults.latency("storage", 0)
    # A new project has no storage policies: the anon key can neither write nor see private objects.
    anon = await acreate_client(standin.url, standin.anon_key)
    try:
        with pytest.raises(StorageApiError) as denied:
            await anon.storage.from_(bucket).upload("y.txt", b"y")
        assert denied.value.status == "403"
        assert await anon.storage.from_(bucket).list() == []
    finally:
        await anon.storage.session.aclose()


async def test_paths_cannot_escape_the_folder(standin: StandIn, bucket: str) -> None:
    headers = {"Authorization": f"Bearer {standin.service_role_key}"}
    async with httpx.AsyncClient(base_url=f"{standin.url}/storage/v1") as http:
        response = await http.post(
            f"/object/{bucket}/a/%2E%2E/%2E%2E/escape.txt", content=b"x", headers=headers
        )
        assert response.status_code == 400 and response.json()["code"] == "InvalidKey"
    assert not (standin.storage_dir / "escape.txt").exists()
    assert not (standin.storage_dir.parent / "escape.txt").exists()
