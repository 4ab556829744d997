"""Artifacts in a Supabase Storage bucket, with public or signed URLs for the web app."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Literal

from loguru import logger
from storage3 import AsyncStorageClient
from storage3.types import CreateOrUpdateBucketOptions, FileOptions

from agent.backends.supabase.transport import boundary
from agent.domain.errors import AgentError, BackendError, NotFound

UrlMode = Literal["public", "signed"]


def object_key(key: str) -> str:
    """`key` as an object name in the bucket; BackendError for one that is empty, absolute or climbs."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in key:
        raise BackendError(f"invalid artifact key: {key!r}")
    return key


def _write_atomically(dest: Path, data: bytes) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _already_exists(exc: BackendError) -> bool:
    # Storage answers 409, or 400 with statusCode "409" and error "Duplicate", by version.
    text = str(exc).lower()
    return "409" in text or "duplicate" in text or "already exists" in text


class SupabaseBlobs:
    """BlobStore over one bucket: uploads overwrite (x-upsert) and carry their content type."""

    def __init__(
        self,
        storage: AsyncStorageClient,
        bucket: str,
        url_mode: UrlMode = "public",
        signed_url_ttl: int = 604800,
    ) -> None:
        self._storage = storage
        self.bucket = bucket
        self.url_mode: UrlMode = url_mode
        self.signed_url_ttl = signed_url_ttl

    async def ensure_bucket(self) -> None:
        """Create the bucket when missing: public for public URLs, private for signed ones."""
        log = logger.bind(bucket=self.bucket, url_mode=self.url_mode)
        options: CreateOrUpdateBucketOptions = {"public": self.url_mode == "public"}
        try:
            with boundary(f"create bucket {self.bucket}"):
                await self._storage.create_bucket(self.bucket, options=options)
        except BackendError as exc:
            if not _already_exists(exc):
                raise
        else:
            log.info("artifacts bucket created")
            return
        try:
            with boundary(f"bucket {self.bucket}"):
                found = await self._storage.get_bucket(self.bucket)
        except AgentError as exc:
            log.debug("cannot read the bucket's settings: {}", exc)
            return
        if self.url_mode == "public" and not found.public:
            log.warning("artifacts bucket is private: its public artifact URLs will not download")

    async def upload(self, key: str, source: Path, content_type: str) -> str:
        key = object_key(key)
        options: FileOptions = {"content-type": content_type, "upsert": "true", "cache-control": "3600"}
        with boundary(f"upload {self.bucket}/{key}"):
            await self._storage.from_(self.bucket).upload(key, source, options)
        return await self.url(key)

    async def url(self, key: str) -> str:
        """The URL the web app uses: stable for public buckets, a fresh token for signed mode."""
        bucket = self._storage.from_(self.bucket)
        if self.url_mode == "public":
            return await bucket.get_public_url(key)
        with boundary(f"sign {self.bucket}/{key}"):
            signed = await bucket.create_signed_url(key, self.signed_url_ttl)
        url = signed.get("signedURL")
        if not url:
            raise BackendError(f"sign {self.bucket}/{key}: Storage returned no signed URL")
        return url

    async def download(self, key: str, dest: Path) -> bool:
        """Download to `dest` (written atomically); False when the object does not exist."""
        key = object_key(key)
        try:
            with boundary(f"download {self.bucket}/{key}"):
                data = await self._storage.from_(self.bucket).download(key)
        except NotFound:
            return False
        try:
            await asyncio.to_thread(_write_atomically, dest, data)
        except OSError as exc:
            raise BackendError(f"cannot write {dest}: {exc}") from exc
        return True
