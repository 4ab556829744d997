"""Storage's data on disk: `<root>/<bucket>/<path>` files, metadata sidecars under `<root>/.standin/`."""

from __future__ import annotations

import hashlib
import json
import mimetypes
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

_BUCKET_NAME = re.compile(r"^[A-Za-z0-9_!\-.*'() &$@=;:+,?]{1,100}$")
DEFAULT_CACHE_CONTROL = "no-cache"


class StorageError(Exception):
    """An error storage-api renders as {statusCode, code, error, message}."""

    def __init__(self, status_code: int, code: str, message: str, error: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.error = error or code

    @property
    def http_status(self) -> int:
        # storage-api answers 400 for every handled error but a 500 (the body has the real code).
        return 500 if self.status_code == 500 else 400

    def body(self) -> dict[str, str]:
        return {
            "statusCode": str(self.status_code),
            "code": self.code,
            "error": self.error,
            "message": self.message,
        }


def no_such_bucket() -> StorageError:
    return StorageError(404, "NoSuchBucket", "Bucket not found", "Bucket not found")


def no_such_key() -> StorageError:
    return StorageError(404, "NoSuchKey", "Object not found", "not_found")


def invalid_key(key: str) -> StorageError:
    return StorageError(400, "InvalidKey", f"Invalid key: {key}")


def iso(ts: datetime) -> str:
    """A timestamp as storage-api's JSON has it (a JS Date: milliseconds, `Z`)."""
    ts = ts.astimezone(UTC)
    return ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


def now() -> str:
    return iso(datetime.now(UTC))


@dataclass
class StoredObject:
    """An object's row in storage.objects, and where its bytes are."""

    bucket: str
    name: str
    row: dict[str, Any]
    path: Path

    @property
    def metadata(self) -> dict[str, Any]:
        return dict(self.row.get("metadata") or {})

    def listing(self, name: str | None = None) -> dict[str, Any]:
        """The row as `object/list` returns it."""
        keys = ("id", "updated_at", "created_at", "last_accessed_at", "metadata")
        return {"name": name if name is not None else self.name, **{k: self.row.get(k) for k in keys}}

    def full_row(self) -> dict[str, Any]:
        return {"name": self.name, "bucket_id": self.bucket, **self.row}


class ObjectStore:
    """Buckets and objects in a folder; paths from requests never leave it."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self._meta = self.root / ".standin"
        (self._meta / "buckets").mkdir(parents=True, exist_ok=True)

    # Buckets ------------------------------------------------------------------------------------

    def _bucket_file(self, bucket_id: str) -> Path:
        if not _BUCKET_NAME.match(bucket_id) or bucket_id.startswith(".") or "/" in bucket_id:
            raise StorageError(400, "InvalidBucketName", "Bucket name invalid", "Invalid Input")
        return self._meta / "buckets" / f"{bucket_id}.json"

    def get_bucket(self, bucket_id: str) -> dict[str, Any] | None:
        try:
            path = self._bucket_file(bucket_id)
        except StorageError:
            return None
        return json.loads(path.read_text()) if path.exists() else None

    def require_bucket(self, bucket_id: str) -> dict[str, Any]:
        bucket = self.get_bucket(bucket_id)
        if bucket is None:
            raise no_such_bucket()
        return bucket

    def list_buckets(self) -> list[dict[str, Any]]:
        files = sorted((self._meta / "buckets").glob("*.json"))
        return [json.loads(f.read_text()) for f in files]

    def create_bucket(
        self,
        bucket_id: str,
        name: str,
        *,
        public: bool = False,
        file_size_limit: int | None = None,
        allowed_mime_types: list[str] | None = None,
        owner: str | None = None,
    ) -> dict[str, Any]:
        path = self._bucket_file(bucket_id)
        if path.exists():
            raise StorageError(409, "BucketAlreadyExists", "The resource already exists", "Duplicate")
        stamp = now()
        bucket = {
            "id": bucket_id,
            "name": name,
            "owner": owner,
            "public": public,
            "type": "STANDARD",
            "file_size_limit": file_size_limit,
            "allowed_mime_types": allowed_mime_types,
            "created_at": stamp,
            "updated_at": stamp,
        }
        _write_json(path, bucket)
        (self.root / bucket_id).mkdir(exist_ok=True)
        return bucket

    def update_bucket(self, bucket_id: str, changes: dict[str, Any]) -> None:
        bucket = self.require_bucket(bucket_id)
        for key in ("public", "file_size_limit", "allowed_mime_types"):
            if key in changes:
                bucket[key] = changes[key]
        bucket["updated_at"] = now()
        _write_json(self._bucket_file(bucket_id), bucket)

    def delete_bucket(self, bucket_id: str) -> None:
        self.require_bucket(bucket_id)
        if self.names(bucket_id):
            raise StorageError(409, "InvalidRequest", "The bucket you tried to delete is not empty")
        self._bucket_file(bucket_id).unlink()
        shutil.rmtree(self.root / bucket_id, ignore_errors=True)
        shutil.rmtree(self._meta / "objects" / bucket_id, ignore_errors=True)

    def empty_bucket(self, bucket_id: str) -> None:
        self.require_bucket(bucket_id)
        self.delete(bucket_id, self.names(bucket_id))

    # Objects ------------------------------------------------------------------------------------

    def _paths(self, bucket: str, name: str) -> tuple[Path, Path]:
        """The data file and the sidecar of an object; refuses names that could escape the bucket."""
        _check_name(name)
        self._bucket_file(bucket)
        base = (self.root / bucket).resolve()
        data = (base / name).resolve()
        if base not in data.parents:
            raise invalid_key(name)
        return data, self._meta / "objects" / bucket / f"{name}.json"

    def find(self, bucket: str, name: str) -> StoredObject | None:
        data, meta = self._paths(bucket, name)
        if not data.is_file():
            return None
        row = json.loads(meta.read_text()) if meta.exists() else _row_for_unknown_file(bucket, name, data)
        return StoredObject(bucket, name, row, data)

    def require(self, bucket: str, name: str) -> StoredObject:
        found = self.find(bucket, name)
        if found is None:
            raise no_such_key()
        return found

    def put(
        self,
        bucket: str,
        name: str,
        content: bytes,
        *,
        content_type: str,
        cache_control: str = DEFAULT_CACHE_CONTROL,
        upsert: bool = False,
        owner: str | None = None,
        user_metadata: dict[str, Any] | None = None,
    ) -> StoredObject:
        """Write an object (atomically); an existing one only with `upsert`."""
        self.require_bucket(bucket)
        data, meta = self._paths(bucket, name)
        existing = self.find(bucket, name)
        if existing is not None and not upsert:
            raise StorageError(409, "KeyAlreadyExists", "The resource already exists", "Duplicate")
        stamp = now()
        row = {
            "id": existing.row["id"] if existing else str(uuid.uuid4()),
            "owner": owner,
            "owner_id": owner,
            "version": str(uuid.uuid4()),
            "created_at": existing.row["created_at"] if existing else stamp,
            "updated_at": stamp,
            "last_accessed_at": stamp,
            "metadata": {
                "eTag": f'"{hashlib.md5(content).hexdigest()}"',
                "size": len(content),
                "mimetype": content_type,
                "cacheControl": cache_control,
                "lastModified": stamp,
                "contentLength": len(content),
                "httpStatusCode": 200,
            },
            "user_metadata": user_metadata,
        }
        _write_bytes(data, content)
        _write_json(meta, row)
        return StoredObject(bucket, name, row, data)

    def delete(self, bucket: str, names: list[str]) -> list[StoredObject]:
        deleted = []
        for name in names:
            found = self.find(bucket, name)
            if found is None:
                continue
            _, meta = self._paths(bucket, name)
            found.path.unlink(missing_ok=True)
            meta.unlink(missing_ok=True)
            deleted.append(found)
        return deleted

    def copy(self, bucket: str, source: str, dest_bucket: str, dest: str, *, move: bool) -> StoredObject:
        found = self.require(bucket, source)
        if self.find(dest_bucket, dest) is not None:
            raise StorageError(409, "KeyAlreadyExists", "The resource already exists", "Duplicate")
        metadata = found.metadata
        copied = self.put(
            dest_bucket,
            dest,
            found.path.read_bytes(),
            content_type=str(metadata.get("mimetype", "application/octet-stream")),
            cache_control=str(metadata.get("cacheControl", DEFAULT_CACHE_CONTROL)),
            owner=found.row.get("owner"),
            user_metadata=found.row.get("user_metadata"),
        )
        if move:
            self.delete(bucket, [source])
        return copied

    def names(self, bucket: str) -> list[str]:
        """Every object name in a bucket."""
        base = self.root / bucket
        if not base.is_dir():
            return []
        return sorted(
            p.relative_to(base).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".upload-")
        )

    def _names_from(self, bucket: str, lowered: str) -> dict[str, str | None]:
        """The names of `names()` that can start with `lowered`, found below its folder alone.

        A listing walks only the folder it lists, not the bucket: a dataset's folder listings would
        otherwise cost a walk of every object each. Each name maps to its data file when that is a
        plain file reached through plain folders (inside the bucket by construction), else to None.
        """
        folder = lowered[: lowered.rfind("/") + 1]
        base = self.root / bucket
        if not folder.isascii():
            # Lower-casing non-ASCII text can change its length: match on whole names as storage does.
            return dict.fromkeys(self.names(bucket))
        if not base.is_dir():
            return {}
        dirs: list[tuple[str, str]] = [(str(base), "")]
        for part in folder.split("/")[:-1]:
            dirs = [
                (entry.path, f"{rel}{entry.name}/")
                for path, rel in dirs
                for entry in _scan(path)
                if entry.name.lower() == part and entry.is_dir(follow_symlinks=False)
            ]
        found: dict[str, str | None] = {}

        def walk(path: str, rel: str) -> None:
            # As names(): rglob descends into folders, not into links to folders, and keeps links to files.
            for entry in _scan(path):
                if entry.is_dir(follow_symlinks=False):
                    walk(entry.path, f"{rel}{entry.name}/")
                elif entry.is_file() and not entry.name.startswith(".upload-"):
                    plain = entry.is_file(follow_symlinks=False)
                    found[rel + entry.name] = entry.path if plain else None

        for path, rel in dirs:
            walk(path, rel)
        return found

    def _listed(self, bucket: str, name: str, data: str | None, *, checked: bool) -> StoredObject | None:
        """find() for a name a folder walk returned: a plain file needs no resolving of its path, and
        plain strings keep a listing of thousands of objects quick. `checked`: the bucket name was."""
        if data is None:
            return self.find(bucket, name)
        _check_name(name)
        if not checked:
            self._bucket_file(bucket)
        try:
            with open(f"{self._meta}/objects/{bucket}/{name}.json", "rb") as f:
                row = json.loads(f.read())
        except FileNotFoundError:
            if not os.path.isfile(data):
                return None
            row = _row_for_unknown_file(bucket, name, Path(data))
        return StoredObject(bucket, name, row, Path(data))

    def search(
        self,
        bucket: str,
        prefix: str,
        *,
        limit: int = 100,
        offset: int = 0,
        search: str = "",
        sort_column: str = "name",
        sort_order: str = "asc",
    ) -> list[dict[str, Any]]:
        """storage.search: the folders and files right under `prefix` (a folder), names relative to it."""
        limit = min(limit or 100, 1500)
        full = (prefix + search).lower()
        folders: dict[str, str] = {}  # lowercased folder key -> display name
        files: list[StoredObject] = []
        candidates = self._names_from(bucket, full)
        for name in sorted(candidates):
            if not name.lower().startswith(full):
                continue
            slash = name.find("/", len(full))
            if slash >= 0:
                folders.setdefault(name[: slash + 1].lower(), name[len(prefix) : slash])
                continue
            found = self._listed(bucket, name, candidates[name], checked=bool(files))
            if found is not None:
                files.append(found)
        descending = sort_order.lower() == "desc"
        column = (
            sort_column if sort_column in ("name", "updated_at", "created_at", "last_accessed_at") else "name"
        )
        if column == "name":
            entries: list[tuple[str, dict[str, Any]]] = [
                (key, _folder(display)) for key, display in folders.items()
            ] + [(f.name.lower(), f.listing(f.name[len(prefix) :])) for f in files]
            entries.sort(key=lambda e: e[0].encode(), reverse=descending)
            ordered = [e[1] for e in entries]
        else:
            folder_entries = [_folder(d) for _, d in sorted(folders.items(), reverse=descending)]
            files.sort(key=lambda f: str(f.row.get(column) or ""), reverse=descending)
            ordered = folder_entries + [f.listing(f.name[len(prefix) :]) for f in files]
        return ordered[offset : offset + limit]


def _check_name(name: str) -> None:
    parts = name.split("/")
    if (
        not name
        or name.startswith("/")
        or any(p in ("", ".", "..") for p in parts)
        or "\\" in name
        or "\x00" in name
        or len(name) > 1024
    ):
        raise invalid_key(name)


def _scan(path: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as entries:
            return list(entries)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []


def _folder(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "id": None,
        "updated_at": None,
        "created_at": None,
        "last_accessed_at": None,
        "metadata": None,
    }


def _row_for_unknown_file(bucket: str, name: str, data: Path) -> dict[str, Any]:
    """A row for a file placed in the folder by hand, so tests can seed buckets by copying files."""
    stat = data.stat()
    stamp = iso(datetime.fromtimestamp(stat.st_mtime, UTC))
    mimetype = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{bucket}/{name}")),
        "owner": None,
        "owner_id": None,
        "version": None,
        "created_at": stamp,
        "updated_at": stamp,
        "last_accessed_at": stamp,
        "metadata": {
            "eTag": f'"{hashlib.md5(data.read_bytes()).hexdigest()}"',
            "size": stat.st_size,
            "mimetype": mimetype,
            "cacheControl": DEFAULT_CACHE_CONTROL,
            "lastModified": stamp,
            "contentLength": stat.st_size,
            "httpStatusCode": 200,
        },
        "user_metadata": None,
    }


def _write_bytes(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".upload-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_json(path: Path, value: dict[str, Any]) -> None:
    _write_bytes(path, json.dumps(value).encode())
