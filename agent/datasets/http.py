"""HTTP(S) datasets: files fetched with httpx, folders listed from directory index pages.

Understands the HTML indexes of `python -m http.server`, nginx `autoindex` (HTML or JSON) and Apache,
by collecting the links that lead strictly below the folder being listed.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import IO
from urllib.parse import quote, unquote, urljoin, urlsplit

import httpx

from agent.datasets.aio import gather_all
from agent.datasets.netguard import AddressGuard, GuardedTransport
from agent.datasets.refs import HttpRef, StorageRef
from agent.datasets.remote import ListingUnavailable, RemoteError, RemoteFile, RemoteNotFound, RemoteTransient

USER_AGENT = "saturnos-agent"
_MAX_DEPTH = 32
_TRANSIENT_STATUS = frozenset({408, 425, 429})
_BUFFER_LIMIT = 4 * 1024 * 1024
MAX_REDIRECTS = 5
# No dataset file is this large; a server that sends more is stopped before it fills the disk.
MAX_FILE_BYTES = 4 * 1024**3
# A directory index page larger than this is not a listing worth parsing.
MAX_LISTING_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ListingEntry:
    name: str
    is_dir: bool
    size: int | None = None


class HttpSource:
    """A dataset folder on an HTTP(S) server; paths are relative to the YAML's folder URL."""

    def __init__(self, ref: HttpRef, client: httpx.AsyncClient) -> None:
        self._ref = ref
        self._root = ref.folder_url
        self._client = client

    @classmethod
    def create(
        cls,
        ref: HttpRef | StorageRef,
        *,
        concurrency: int = 16,
        timeout: float = 60.0,
        allow_private: bool = False,
    ) -> HttpSource:
        """The default factory for `http` references: every connection vetted by an AddressGuard."""
        if not isinstance(ref, HttpRef):
            raise TypeError("HttpSource serves http(s) references only")
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        transport = GuardedTransport(httpx.AsyncHTTPTransport(limits=limits), AddressGuard(allow_private))
        client = httpx.AsyncClient(
            transport=transport,
            # Redirects are followed here, one hop at a time, each through the guarded transport.
            follow_redirects=False,
            headers={"User-Agent": USER_AGENT},
            # Requests queue for a pooled connection, so only the network phases have deadlines.
            timeout=httpx.Timeout(timeout, connect=min(timeout, 15.0), pool=None),
        )
        return cls(ref, client)

    @property
    def cache_key(self) -> str:
        return self._ref.cache_key

    def url(self, path: str) -> str:
        if path == self._ref.yaml_name:
            # The YAML itself keeps its query string: a signed URL's token is valid for it alone.
            return self._ref.url
        return self._root + quote(path, safe="/")

    def describe(self, path: str) -> str:
        return self._root + quote(path, safe="/")

    async def aclose(self) -> None:
        await self._client.aclose()

    async def fetch(self, path: str, dest: Path) -> int:
        url = self.url(path)
        try:
            response = await self._open(url)
            try:
                _raise_for_status(response, self.describe(path))
                expected = _content_length(response)
                written = await _write_body(response, dest)
                received = response.num_bytes_downloaded
            finally:
                await response.aclose()
        except httpx.RequestError as exc:
            raise _request_error(exc) from exc
        if expected is not None and received != expected:
            raise RemoteTransient(f"size mismatch: announced {expected} bytes, received {received}")
        return written

    async def _open(self, url: str) -> httpx.Response:
        """GET `url` as a stream, following redirects one hop at a time (each hop vetted)."""
        for _ in range(MAX_REDIRECTS + 1):
            response = await self._client.send(self._client.build_request("GET", url), stream=True)
            location = response.headers.get("location") if response.is_redirect else None
            if location is None:
                return response
            await response.aclose()
            target = response.url.join(location)
            if target.scheme not in ("http", "https"):
                raise RemoteError(f"redirect to an unsupported scheme {target.scheme[:20]!r}: {_plain(url)}")
            url = str(target)
        raise RemoteError(f"more than {MAX_REDIRECTS} redirects: {_plain(url)}")

    async def list_files(self, prefix: str) -> list[RemoteFile]:
        found: list[RemoteFile] = []
        seen: set[str] = set()

        async def walk(folder: str, depth: int) -> None:
            if folder in seen or depth > _MAX_DEPTH:
                return
            seen.add(folder)
            entries = await self._list_one(folder, top=depth == 0)
            subfolders: list[str] = []
            for entry in entries:
                rel = f"{folder}/{entry.name}" if folder else entry.name
                if entry.is_dir:
                    subfolders.append(rel)
                else:
                    found.append(RemoteFile(rel, entry.size))
            await gather_all([walk(sub, depth + 1) for sub in subfolders])

        await walk(prefix.strip("/"), 0)
        return sorted(found, key=lambda f: f.path)

    async def _list_one(self, folder: str, *, top: bool) -> list[ListingEntry]:
        url = self._root + (quote(folder, safe="/") + "/" if folder else "")
        try:
            response = await self._open(url)
            try:
                body = await _read_capped(response, MAX_LISTING_BYTES)
            finally:
                await response.aclose()
        except httpx.RequestError as exc:
            raise _request_error(exc) from exc
        if response.status_code in (404, 410):
            return []
        if response.status_code in (401, 403, 405):
            raise ListingUnavailable(f"HTTP {response.status_code}: the server does not list {url}")
        _raise_for_status(response, url)
        if body is None:
            raise RemoteError(f"directory listing larger than {MAX_LISTING_BYTES} bytes: {url}")
        content_type = response.headers.get("content-type", "text/html")
        text = body.decode(response.encoding or "utf-8", errors="replace")
        if "json" in content_type:
            return parse_json_listing(text)
        if "html" not in content_type:
            if top:
                raise ListingUnavailable(f"{url} is not a directory listing ({content_type[:100]})")
            return []
        return parse_html_listing(text, str(response.url))


def parse_html_listing(html: str, folder_url: str) -> list[ListingEntry]:
    """Entries of an index page: links one level below `folder_url` (parent and sorting links skipped)."""
    base = urlsplit(folder_url)
    base_path = base.path if base.path.endswith("/") else base.path + "/"
    collector = _Links()
    collector.feed(html)
    entries: dict[str, ListingEntry] = {}
    for href in collector.hrefs:
        if "?" in href or "#" in href or href.startswith(("mailto:", "javascript:")):
            continue
        target = urlsplit(urljoin(base._replace(path=base_path).geturl(), href))
        if (target.scheme, target.netloc) != (base.scheme, base.netloc) or not target.path.startswith(
            base_path
        ):
            continue
        rest = target.path[len(base_path) :]
        is_dir = rest.endswith("/")
        rest = rest.rstrip("/")
        if not rest or "/" in rest:
            continue
        name = unquote(rest)
        if name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
            continue
        entries.setdefault(name, ListingEntry(name, is_dir))
    return list(entries.values())


def parse_json_listing(text: str) -> list[ListingEntry]:
    """nginx `autoindex_format json`: [{"name", "type": "file"|"directory", "size"}]."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RemoteError(f"directory listing is not valid JSON: {exc.msg}") from exc
    if not isinstance(data, list):
        raise RemoteError("directory listing JSON is not a list")
    entries: list[ListingEntry] = []
    for item in data:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            continue
        name = item["name"]
        if name in ("", ".", "..") or "/" in name or "\\" in name or "\x00" in name:
            continue
        size = item.get("size")
        entries.append(
            ListingEntry(name, item.get("type") == "directory", size if isinstance(size, int) else None)
        )
    return entries


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            for key, value in attrs:
                if key == "href" and value:
                    self.hrefs.append(value.strip())


async def _read_capped(response: httpx.Response, limit: int) -> bytes | None:
    """The body, or None once it grows past `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _plain(url: str) -> str:
    """A URL for a message: no query string (it may hold a token), at most 200 characters."""
    parts = urlsplit(url)
    shown = f"{parts.scheme}://{parts.netloc}{parts.path}"
    return shown if len(shown) <= 200 else shown[:199] + "…"


def _request_error(exc: httpx.RequestError) -> RemoteError:
    message = f"{type(exc).__name__}: {exc or 'request failed'}"
    if isinstance(exc, (httpx.UnsupportedProtocol, httpx.TooManyRedirects)):
        return RemoteError(message)
    # Connection failures, timeouts, broken or undecodable bodies.
    return RemoteTransient(message)


def _raise_for_status(response: httpx.Response, where: str) -> None:
    status = response.status_code
    if status < 300:
        return
    if status in (404, 410):
        raise RemoteNotFound(f"HTTP {status}: {where}")
    if status >= 500 or status in _TRANSIENT_STATUS:
        raise RemoteTransient(f"HTTP {status}: {where}", _retry_after(response))
    raise RemoteError(f"HTTP {status}: {where}")


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


async def _write_body(response: httpx.Response, dest: Path) -> int:
    # Most dataset files are small: buffer them and write once, rather than a thread hop per chunk.
    buffered: list[bytes] = []
    size = 0
    handle: IO[bytes] | None = None
    try:
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > MAX_FILE_BYTES:
                raise RemoteError(
                    f"a file larger than {MAX_FILE_BYTES // 1024**3} GB: {_plain(str(response.url))}"
                )
            if handle is None:
                buffered.append(chunk)
                if size > _BUFFER_LIMIT:
                    handle = await asyncio.to_thread(_open_and_write, dest, b"".join(buffered))
                    buffered.clear()
            else:
                await asyncio.to_thread(handle.write, chunk)
        if handle is None:
            await asyncio.to_thread(dest.write_bytes, b"".join(buffered))
    finally:
        if handle is not None:
            await asyncio.to_thread(handle.close)
    return size


def _open_and_write(dest: Path, data: bytes) -> IO[bytes]:
    handle = dest.open("wb")
    handle.write(data)
    return handle
