"""BlobStore contract: upload returns a URL, download gives the same bytes back."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.domain.errors import BackendError
from agent.ports import BlobStore


async def test_upload_then_download_round_trips_and_overwrites(blobs: BlobStore, tmp_path: Path) -> None:
    source = tmp_path / "best.pt"
    source.write_bytes(b"weights-v1")
    key = "training_runs/r1/weights/best.pt"
    url = await blobs.upload(key, source, "application/octet-stream")
    assert isinstance(url, str) and url
    assert key.rsplit("/", 1)[-1] in url

    dest = tmp_path / "out" / "best.pt"
    assert await blobs.download(key, dest)
    assert dest.read_bytes() == b"weights-v1"

    source.write_bytes(b"weights-v2")
    assert await blobs.upload(key, source, "application/octet-stream") == url
    assert await blobs.download(key, dest)
    assert dest.read_bytes() == b"weights-v2"


async def test_download_of_a_missing_object_is_false(blobs: BlobStore, tmp_path: Path) -> None:
    dest = tmp_path / "missing.pt"
    assert await blobs.download("training_runs/none/weights/best.pt", dest) is False
    assert not dest.exists()


@pytest.mark.parametrize("key", ["../outside.pt", "training_runs/../../x.pt", "/etc/x.pt", ""])
async def test_a_key_that_escapes_the_store_is_refused(blobs: BlobStore, tmp_path: Path, key: str) -> None:
    source = tmp_path / "x.pt"
    source.write_bytes(b"x")
    with pytest.raises(BackendError):
        await blobs.upload(key, source, "application/octet-stream")
    with pytest.raises(BackendError):
        await blobs.download(key, tmp_path / "y.pt")
