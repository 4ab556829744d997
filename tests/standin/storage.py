"""Storage at `/storage/v1`: storage-api's bucket and object routes over an ObjectStore."""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any
from urllib.parse import quote

from aiohttp import BodyPartReader, web

from tests.standin.auth import TokenError, sign, verify
from tests.standin.storage_store import (
    DEFAULT_CACHE_CONTROL,
    ObjectStore,
    StorageError,
    StoredObject,
    no_such_bucket,
    no_such_key,
)

MAX_UPLOAD_BYTES = 50 * 1024 * 1024  # a project's default global upload limit
UPLOAD_URL_EXPIRY = 2 * 60 * 60
# jose's messages, which storage-api passes on when it refuses a JWT
_JOSE_MESSAGES = {
    "missing": "Invalid Compact JWS",
    "malformed": "Invalid Compact JWS",
    "signature": "signature verification failed",
    "expired": '"exp" claim timestamp check failed',
    "claims": "Invalid Compact JWS",
}


@dataclass
class Caller:
    """Who is asking: storage-api's `isAuthenticated` and the role of the JWT."""

    authenticated: bool
    role: str
    owner: str | None

    @property
    def superuser(self) -> bool:
        # A new project has no storage policies: only the service role (bypassing RLS) can write or read.
        return self.role == "service_role"


def access_denied(message: str) -> StorageError:
    return StorageError(403, "AccessDenied", message, "Unauthorized")


def rls_violation(table: str) -> StorageError:
    return access_denied(f'new row violates row-level security policy for table "{table}"')


class Storage:
    """The storage-api endpoint."""

    def __init__(self, store: ObjectStore, jwt_secret: str) -> None:
        self.store = store
        self._secret = jwt_secret

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._route(request, request.match_info.get("tail", ""))
        except StorageError as exc:
            return web.json_response(exc.body(), status=exc.http_status)

    async def _route(self, request: web.Request, tail: str) -> web.StreamResponse:
        method = request.method
        parts = tail.split("/")
        head = parts[0]
        if head == "bucket":
            return await self._bucket_route(request, parts[1:])
        if head != "object" or len(parts) < 2:
            raise StorageError(404, "NotFound", f"Route {method}:/{tail} not found", "Not Found")
        kind, rest = parts[1], parts[2:]
        if kind == "public" and method in ("GET", "HEAD") and len(rest) >= 2:
            return await self._serve_public(request, rest[0], "/".join(rest[1:]))
        if kind == "authenticated" and method in ("GET", "HEAD") and len(rest) >= 2:
            caller = self._caller(request, allow_invalid=False)
            return await self._serve(request, caller, rest[0], "/".join(rest[1:]))
        if kind == "info" and method == "GET" and rest:
            return await self._info(request, rest)
        if kind == "sign" and rest:
            if method == "GET" and len(rest) >= 2:
                return await self._serve_signed(request, rest[0], "/".join(rest[1:]))
            if method == "POST":
                caller = self._caller(request, allow_invalid=False)
                if len(rest) == 1:
                    return await self._sign_many(request, caller, rest[0])
                return await self._sign(request, caller, rest[0], "/".join(rest[1:]))
        if kind == "upload" and rest[:1] == ["sign"] and len(rest) >= 3:
            bucket, name = rest[1], "/".join(rest[2:])
            if method == "POST":
                return self._sign_upload(request, self._caller(request, allow_invalid=False), bucket, name)
            if method == "PUT":
                return await self._upload_signed(request, bucket, name)
        if kind == "list" and method == "POST" and len(rest) == 1:
            return await self._list(request, self._caller(request, allow_invalid=False), rest[0])
        if kind in ("move", "copy") and method == "POST" and not rest:
            return await self._copy(request, self._caller(request, allow_invalid=False), move=kind == "move")
        bucket, name = kind, "/".join(rest)
        if method == "DELETE" and not rest:
            return await self._remove(request, self._caller(request, allow_invalid=False), bucket)
        if not name:
            raise StorageError(404, "NotFound", f"Route {method}:/{tail} not found", "Not Found")
        if method in ("POST", "PUT"):
            caller = self._caller(request, allow_invalid=False)
            return await self._upload(request, caller, bucket, name, upsert=method == "PUT")
        if method in ("GET", "HEAD"):
            return await self._serve(request, self._caller(request, allow_invalid=True), bucket, name)
        if method == "DELETE":
            return self._delete_one(self._caller(request, allow_invalid=False), bucket, name)
        raise StorageError(404, "NotFound", f"Route {method}:/{tail} not found", "Not Found")

    def _caller(self, request: web.Request, *, allow_invalid: bool) -> Caller:
        """storage-api's JWT check; routes that allow it fall back to an unauthenticated anon caller."""
        token = re.sub(
            r"^Bearer\s+", "", request.headers.get("Authorization", ""), flags=re.IGNORECASE
        ).strip()
        if not token and allow_invalid:
            return Caller(False, "anon", None)
        try:
            claims = verify(token, self._secret, require_role=False)
        except TokenError as exc:
            if allow_invalid:
                return Caller(False, "anon", None)
            raise access_denied(_JOSE_MESSAGES[exc.kind]) from None
        return Caller(True, str(claims.get("role") or "anon"), claims.get("sub"))

    # Buckets ------------------------------------------------------------------------------------

    async def _bucket_route(self, request: web.Request, rest: list[str]) -> web.StreamResponse:
        caller = self._caller(request, allow_invalid=False)
        method = request.method
        if not rest or rest == [""]:
            if method == "GET":
                buckets = self.store.list_buckets() if caller.superuser else []
                return web.json_response([_bucket_json(b) for b in buckets])
            if method == "POST":
                body = await _json_body(request)
                if not caller.superuser:
                    raise rls_violation("buckets")
                name = body.get("name")
                if not isinstance(name, str):
                    raise StorageError(400, "InvalidRequest", "body must have required property 'name'")
                self.store.create_bucket(
                    str(body.get("id") or name),
                    name,
                    public=bool(body.get("public", False)),
                    file_size_limit=_size_limit(body.get("file_size_limit")),
                    allowed_mime_types=body.get("allowed_mime_types"),
                    owner=caller.owner,
                )
                return web.json_response({"name": name})
        bucket_id = rest[0]
        found = self.store.get_bucket(bucket_id) if caller.superuser else None
        if found is None:
            raise no_such_bucket()
        if len(rest) == 1 and method == "GET":
            return web.json_response(_bucket_json(found))
        if len(rest) == 1 and method == "PUT":
            body = await _json_body(request)
            if "file_size_limit" in body:
                body["file_size_limit"] = _size_limit(body["file_size_limit"])
            self.store.update_bucket(bucket_id, body)
            return web.json_response({"message": "Successfully updated"})
        if len(rest) == 1 and method == "DELETE":
            self.store.delete_bucket(bucket_id)
            return web.json_response({"message": "Successfully deleted"})
        if rest[1:] == ["empty"] and method == "POST":
            await asyncio.to_thread(self.store.empty_bucket, bucket_id)
            return web.json_response({"message": "Successfully emptied"})
        raise StorageError(404, "NotFound", f"Route {method}:/bucket/{'/'.join(rest)} not found", "Not Found")

    # Uploads ------------------------------------------------------------------------------------

    async def _upload(
        self, request: web.Request, caller: Caller, bucket: str, name: str, *, upsert: bool
    ) -> web.StreamResponse:
        if request.method == "POST":
            upsert = request.headers.get("x-upsert") == "true"
        found = self.store.require_bucket(bucket)
        if not caller.superuser:
            raise rls_violation("objects")
        stored = await self._store_upload(request, found, name, upsert=upsert, owner=caller.owner)
        return web.json_response({"Id": stored.row["id"], "Key": f"{bucket}/{name}"})

    async def _store_upload(
        self, request: web.Request, bucket: dict[str, Any], name: str, *, upsert: bool, owner: str | None
    ) -> StoredObject:
        content, content_type, cache_time, user_metadata = await _read_upload(request)
        limit = bucket.get("file_size_limit") or MAX_UPLOAD_BYTES
        if len(content) > min(int(limit), MAX_UPLOAD_BYTES):
            raise StorageError(
                413, "EntityTooLarge", "The object exceeded the maximum allowed size", "Payload too large"
            )
        allowed = bucket.get("allowed_mime_types")
        if allowed and not _mime_allowed(content_type, allowed):
            raise StorageError(
                415, "InvalidMimeType", f"mime type {content_type} is not supported", "invalid_mime_type"
            )
        return await asyncio.to_thread(
            self.store.put,
            bucket["id"],
            name,
            content,
            content_type=content_type,
            cache_control=f"max-age={cache_time}" if cache_time else DEFAULT_CACHE_CONTROL,
            upsert=upsert,
            owner=owner,
            user_metadata=user_metadata,
        )

    def _sign_upload(
        self, request: web.Request, caller: Caller, bucket: str, name: str
    ) -> web.StreamResponse:
        self.store.require_bucket(bucket)
        if not caller.superuser:
            raise rls_violation("objects")
        upsert = request.headers.get("x-upsert") == "true"
        if not upsert and self.store.find(bucket, name) is not None:
            raise StorageError(409, "KeyAlreadyExists", "The resource already exists", "Duplicate")
        url = f"{bucket}/{name}"
        claims = {"owner": caller.owner, "url": url, "upsert": upsert, "scope": "upload"}
        token = sign(self._secret, claims, UPLOAD_URL_EXPIRY)
        return web.json_response({"url": f"/object/upload/sign/{url}?token={token}", "token": token})

    async def _upload_signed(self, request: web.Request, bucket: str, name: str) -> web.StreamResponse:
        claims = self._verify_signed(request.query.get("token"), bucket, name, "upload")
        found = self.store.require_bucket(bucket)
        stored = await self._store_upload(
            request, found, name, upsert=bool(claims.get("upsert")), owner=claims.get("owner")
        )
        return web.json_response({"Id": stored.row["id"], "Key": f"{bucket}/{name}"})

    # Downloads ----------------------------------------------------------------------------------

    async def _serve(
        self, request: web.Request, caller: Caller, bucket: str, name: str
    ) -> web.StreamResponse:
        found_bucket = self.store.get_bucket(bucket)
        if found_bucket is None or (not caller.authenticated and not found_bucket.get("public")):
            raise no_such_bucket()
        if not found_bucket.get("public") and not caller.superuser:
            raise no_such_key()  # row-level security hides every object of a private bucket
        return await _object_response(request, self.store.require(bucket, name))

    async def _serve_public(self, request: web.Request, bucket: str, name: str) -> web.StreamResponse:
        found_bucket = self.store.get_bucket(bucket)
        if found_bucket is None or not found_bucket.get("public"):
            raise no_such_bucket()
        return await _object_response(request, self.store.require(bucket, name))

    async def _serve_signed(self, request: web.Request, bucket: str, name: str) -> web.StreamResponse:
        claims = self._verify_signed(request.query.get("token"), bucket, name, "download")
        response = await _object_response(request, self.store.require(bucket, name))
        response.headers["Expires"] = format_datetime(
            datetime.fromtimestamp(int(claims["exp"]), UTC), usegmt=True
        )
        return response

    def _verify_signed(self, token: str | None, bucket: str, name: str, scope: str) -> dict[str, Any]:
        try:
            claims = verify(token, self._secret, require_role=False)
        except TokenError as exc:
            raise StorageError(400, "InvalidJWT", _JOSE_MESSAGES[exc.kind]) from None
        token_scope = claims.get("scope")
        if token_scope is not None and token_scope != scope:
            raise StorageError(400, "InvalidSignature", f"Token is not scoped for {scope}")
        if claims.get("url") != f"{bucket}/{name}":
            raise StorageError(400, "InvalidSignature", "Invalid signature")
        return claims

    async def _info(self, request: web.Request, rest: list[str]) -> web.StreamResponse:
        public_route = rest[0] == "public"
        if rest[0] in ("public", "authenticated"):
            caller = self._caller(request, allow_invalid=False) if rest[0] == "authenticated" else None
            rest = rest[1:]
        else:
            caller = self._caller(request, allow_invalid=True)
        if len(rest) < 2:
            raise no_such_key()
        bucket, name = rest[0], "/".join(rest[1:])
        found_bucket = self.store.get_bucket(bucket)
        if found_bucket is None:
            raise no_such_bucket()
        if caller is not None:
            if not caller.authenticated and not found_bucket.get("public"):
                raise no_such_bucket()
            if not found_bucket.get("public") and not public_route and not caller.superuser:
                raise no_such_key()
        found = self.store.require(bucket, name)
        metadata = found.metadata
        body = {
            "id": found.row.get("id"),
            "name": found.name,
            "version": found.row.get("version"),
            "bucket_id": bucket,
            "size": metadata.get("size"),
            "content_type": metadata.get("mimetype"),
            "cache_control": metadata.get("cacheControl"),
            "etag": metadata.get("eTag"),
            "metadata": found.row.get("user_metadata"),
            "last_modified": found.row.get("updated_at"),
            "created_at": found.row.get("created_at"),
        }
        response = web.json_response(body)
        response.headers["ETag"] = str(metadata.get("eTag", ""))
        return response

    # Signing, listing, removing -----------------------------------------------------------------

    async def _sign(self, request: web.Request, caller: Caller, bucket: str, name: str) -> web.StreamResponse:
        body = await _json_body(request)
        expires_in = _expires_in(body.get("expiresIn"))
        self.store.require_bucket(bucket)
        if not caller.superuser:
            raise no_such_key()
        self.store.require(bucket, name)
        token = sign(self._secret, {"url": f"{bucket}/{name}", "scope": "download"}, expires_in)
        return web.json_response({"signedURL": f"/object/sign/{bucket}/{name}?token={token}"})

    async def _sign_many(self, request: web.Request, caller: Caller, bucket: str) -> web.StreamResponse:
        body = await _json_body(request)
        expires_in = _expires_in(body.get("expiresIn"))
        paths = body.get("paths")
        if not isinstance(paths, list):
            raise StorageError(400, "InvalidRequest", "body must have required property 'paths'")
        self.store.require_bucket(bucket)
        results = []
        for path in paths:
            exists = caller.superuser and isinstance(path, str) and self.store.find(bucket, path) is not None
            if exists:
                token = sign(self._secret, {"url": f"{bucket}/{path}", "scope": "download"}, expires_in)
                results.append(
                    {"error": None, "path": path, "signedURL": f"/object/sign/{bucket}/{path}?token={token}"}
                )
            else:
                results.append(
                    {
                        "error": "Either the object does not exist or you do not have access to it",
                        "path": path,
                        "signedURL": None,
                    }
                )
        return web.json_response(results)

    async def _list(self, request: web.Request, caller: Caller, bucket: str) -> web.StreamResponse:
        body = await _json_body(request)
        prefix = body.get("prefix")
        if not isinstance(prefix, str):
            raise StorageError(400, "InvalidRequest", "body must have required property 'prefix'")
        self.store.require_bucket(bucket)
        if not caller.superuser:
            return web.json_response([])  # row-level security hides every row
        if prefix and not prefix.endswith("/"):
            prefix += "/"  # storage-api always treats the prefix as a folder
        sort_by = body.get("sortBy")
        if not isinstance(sort_by, dict):
            sort_by = {}
        entries = await asyncio.to_thread(
            self.store.search,
            bucket,
            prefix,
            limit=int(body.get("limit") or 100),
            offset=int(body.get("offset") or 0),
            search=str(body.get("search") or ""),
            sort_column=str(sort_by.get("column") or "name"),
            sort_order=str(sort_by.get("order") or "asc"),
        )
        return web.json_response(entries)

    async def _remove(self, request: web.Request, caller: Caller, bucket: str) -> web.StreamResponse:
        body = await _json_body(request)
        prefixes = body.get("prefixes")
        if not isinstance(prefixes, list) or not prefixes:
            raise StorageError(400, "InvalidRequest", "body/prefixes must NOT have fewer than 1 items")
        self.store.require_bucket(bucket)
        if not caller.superuser:
            return web.json_response([])
        deleted = await asyncio.to_thread(self.store.delete, bucket, [str(p) for p in prefixes])
        return web.json_response([d.full_row() for d in deleted])

    def _delete_one(self, caller: Caller, bucket: str, name: str) -> web.StreamResponse:
        self.store.require_bucket(bucket)
        if not caller.superuser or not self.store.delete(bucket, [name]):
            raise no_such_key()
        return web.json_response({"message": "Successfully deleted"})

    async def _copy(self, request: web.Request, caller: Caller, *, move: bool) -> web.StreamResponse:
        body = await _json_body(request)
        bucket, source, dest = body.get("bucketId"), body.get("sourceKey"), body.get("destinationKey")
        if not all(isinstance(v, str) for v in (bucket, source, dest)):
            raise StorageError(400, "InvalidRequest", "body must have bucketId, sourceKey and destinationKey")
        dest_bucket = str(body.get("destinationBucket") or bucket)
        self.store.require_bucket(str(bucket))
        self.store.require_bucket(dest_bucket)
        if not caller.superuser:
            raise no_such_key()
        copied = await asyncio.to_thread(
            self.store.copy, str(bucket), str(source), dest_bucket, str(dest), move=move
        )
        if move:
            return web.json_response({"message": "Successfully moved"})
        return web.json_response({"Id": copied.row["id"], "Key": f"{dest_bucket}/{dest}"})


async def _object_response(request: web.Request, found: StoredObject) -> web.StreamResponse:
    """The object's bytes with storage-api's headers; a single `Range` is honoured."""
    metadata = found.metadata
    content = b"" if request.method == "HEAD" else await asyncio.to_thread(found.path.read_bytes)
    size = int(metadata.get("size") or found.path.stat().st_size)
    headers = {
        "Content-Type": str(metadata.get("mimetype") or "application/octet-stream"),
        "Cache-Control": str(metadata.get("cacheControl") or DEFAULT_CACHE_CONTROL),
        "ETag": str(metadata.get("eTag") or ""),
        "Accept-Ranges": "bytes",
    }
    last_modified = found.row.get("updated_at")
    if isinstance(last_modified, str):
        stamp = datetime.fromisoformat(last_modified.replace("Z", "+00:00"))
        headers["Last-Modified"] = format_datetime(stamp, usegmt=True)
    download = request.query.get("download")
    if download is not None:
        filename = download or found.name.rsplit("/", 1)[-1]
        headers["Content-Disposition"] = f"attachment; filename={quote(filename)};"
    status = 200
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", request.headers.get("Range", ""))
    if match and (match.group(1) or match.group(2)):
        start = int(match.group(1)) if match.group(1) else max(0, size - int(match.group(2)))
        end = int(match.group(2)) if match.group(1) and match.group(2) else size - 1
        if start >= size:
            raise StorageError(400, "InvalidRange", "invalid range provided", "invalid_range")
        end = min(end, size - 1)
        content = content[start : end + 1] if content else content
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        status = 206
        size = end - start + 1
    if request.method == "HEAD":
        headers["Content-Length"] = str(size)
        return web.Response(status=status, headers=headers)
    return web.Response(status=status, body=content, headers=headers)


async def _read_upload(request: web.Request) -> tuple[bytes, str, str | None, dict[str, Any] | None]:
    """Bytes, content type, cache time and user metadata, from a multipart form or a raw body."""
    if request.content_type == "multipart/form-data":
        content, content_type, cache_time, user_metadata = None, "text/plain", None, None
        reader = await request.multipart()
        async for part in reader:
            if not isinstance(part, BodyPartReader):
                continue
            if part.name == "cacheControl":
                cache_time = (await part.text()).strip()
            elif part.name == "metadata":
                user_metadata = json.loads(await part.text())
            elif part.filename is not None or part.name == "file":
                content = bytes(await part.read())
                content_type = part.headers.get("Content-Type", "text/plain")
        if content is None:
            raise StorageError(400, "InvalidRequest", "No content provided")
        return content, content_type, cache_time, user_metadata
    content = await request.read()
    cache_header = request.headers.get("cache-control")
    return content, request.headers.get("Content-Type", "application/octet-stream"), cache_header, None


def _mime_allowed(content_type: str, allowed: list[str]) -> bool:
    mime = content_type.split(";")[0].strip().lower()
    for pattern in allowed:
        pattern = pattern.lower()
        if pattern == mime or (pattern.endswith("/*") and mime.startswith(pattern[:-1])):
            return True
    return False


def _size_limit(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*(\d+)\s*(b|kb|mb|gb)?\s*", str(value).lower())
    if not match:
        raise StorageError(
            400, "InvalidRequest", "Invalid file size format, hint: use 20GB / 20MB / 30KB / 3B"
        )
    unit = {"b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3}[match.group(2) or "b"]
    return int(match.group(1)) * unit


def _expires_in(value: Any) -> int:
    try:
        expires_in = int(value)
    except (TypeError, ValueError):
        raise StorageError(400, "InvalidRequest", "body must have required property 'expiresIn'") from None
    if expires_in < 1:
        raise StorageError(400, "InvalidRequest", "body/expiresIn must be >= 1")
    return expires_in


async def _json_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise StorageError(400, "InvalidRequest", "Body is not valid JSON") from None
    return body if isinstance(body, dict) else {}


def _bucket_json(bucket: dict[str, Any]) -> dict[str, Any]:
    # storage-api's response schema types `owner` as a string: a null owner is sent as "".
    keys = (
        "id",
        "name",
        "owner",
        "public",
        "type",
        "file_size_limit",
        "allowed_mime_types",
        "created_at",
        "updated_at",
    )
    shown = {k: bucket.get(k) for k in keys}
    shown["owner"] = shown["owner"] or ""
    return shown
