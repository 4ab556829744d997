"""Where a run's `data_yaml` points: a local file, an HTTP(S) URL, or an object in Supabase Storage."""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from agent.datasets.paths import is_within, join_rel
from agent.domain.errors import DatasetError

StorageUrlKind = Literal["uri", "public", "sign", "authenticated"]

# Query parameters that carry signatures or expiry: the same object under a fresh token is the same source.
VOLATILE_QUERY_KEYS = frozenset(
    {
        "token",
        "sig",
        "signature",
        "expires",
        "policy",
        "key-pair-id",
        "download",
        "x-amz-algorithm",
        "x-amz-credential",
        "x-amz-date",
        "x-amz-expires",
        "x-amz-security-token",
        "x-amz-signature",
        "x-amz-signedheaders",
        "x-goog-algorithm",
        "x-goog-credential",
        "x-goog-date",
        "x-goog-expires",
        "x-goog-signature",
        "x-goog-signedheaders",
        "se",
        "sp",
        "sr",
        "st",
        "sv",
        "spr",
        "skoid",
        "sktid",
        "skt",
        "ske",
        "sks",
        "skv",
    }
)
_STORAGE_PATH = re.compile(r"^(?P<prefix>.*?)/storage/v1/object/(?P<rest>.+)$")
_STORAGE_KINDS: dict[str, StorageUrlKind] = {
    "public": "public",
    "sign": "sign",
    "authenticated": "authenticated",
}
_DEFAULT_PORTS = {"http": 80, "https": 443}
# `data:`, `gopher:`, `mailto:`, …: a scheme with no slashes. A drive letter (`C:`) has one character.
_SCHEME = re.compile(r"^(data|gopher|ftp|ftps|sftp|ssh|smb|nfs|dict|ldap|jar|tftp|javascript|mailto):", re.I)


@dataclass(frozen=True, slots=True)
class LocalRef:
    """A YAML on this host's filesystem."""

    path: Path

    @property
    def display(self) -> str:
        return str(self.path)


@dataclass(frozen=True, slots=True)
class HttpRef:
    """A YAML served over HTTP(S); its dataset lives under the same folder URL."""

    url: str

    @property
    def kind(self) -> Literal["http"]:
        return "http"

    @property
    def folder_url(self) -> str:
        parts = urlsplit(self.url)
        folder = parts.path.rsplit("/", 1)[0] + "/"
        return urlunsplit((parts.scheme, parts.netloc, folder, "", ""))

    @property
    def yaml_name(self) -> str:
        return unquote(urlsplit(self.url).path.rsplit("/", 1)[1])

    @property
    def display(self) -> str:
        """The URL without its query string, which may hold a token."""
        parts = urlsplit(self.url)
        return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))

    @property
    def cache_key(self) -> str:
        return "http:" + normalize_url(self.url)


@dataclass(frozen=True, slots=True)
class StorageRef:
    """An object in Supabase Storage: `storage:bucket/path`, or a public, signed or authenticated URL."""

    bucket: str
    path: str  # object path of the YAML inside the bucket, normalized, no leading slash
    url_kind: StorageUrlKind
    url: str | None = None  # the original URL (it may carry a signed token); None for `storage:` URIs
    origin: str | None = None  # scheme://host[/prefix] of the Storage server the URL named

    @property
    def kind(self) -> Literal["storage"]:
        return "storage"

    @property
    def folder(self) -> str:
        return posixpath.dirname(self.path)

    @property
    def yaml_name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def display(self) -> str:
        return f"storage:{self.bucket}/{self.path}"

    @property
    def cache_key(self) -> str:
        return f"storage:{self.origin or ''}/{self.bucket}/{self.path}"


DatasetRef = LocalRef | HttpRef | StorageRef
RemoteRef = HttpRef | StorageRef


def parse_dataset_ref(
    data_yaml: str, dataset_root: Path | None, default_bucket: str = "datasets"
) -> LocalRef | HttpRef | StorageRef:
    """Classify `data_yaml`; relative paths resolve under `dataset_root` and may not climb out of it."""
    try:
        ref = _parse(data_yaml, dataset_root, default_bucket)
        if isinstance(ref, HttpRef):
            ref.cache_key  # noqa: B018 - a malformed port or host fails here, not halfway through a sync
        return ref
    except ValueError as exc:
        raise DatasetError(f"data_yaml is not a valid path or URL: {data_yaml.strip()[:200]!r}") from exc


def _parse(data_yaml: str, dataset_root: Path | None, default_bucket: str) -> LocalRef | HttpRef | StorageRef:
    text = data_yaml.strip()
    if not text:
        raise DatasetError("data_yaml is empty")
    if text.startswith("storage:"):
        return _storage_uri(text, default_bucket)
    scheme = urlsplit(text).scheme.lower()
    if scheme in ("http", "https"):
        return _http(text)
    if scheme == "file":
        path = Path(unquote(urlsplit(text).path))
        if not path.is_absolute():
            raise DatasetError(f"file URL must be absolute: {text[:200]}")
        return LocalRef(path)
    if len(scheme) > 1 and (":/" in text or _SCHEME.match(text)):
        raise DatasetError(
            f"unsupported dataset URL scheme {scheme[:20]!r}: use a path, https:// or storage:bucket/path"
        )
    path = Path(text)
    if path.is_absolute():
        return LocalRef(path)
    if dataset_root is None:
        raise DatasetError(f"data_yaml {text[:200]!r} is a relative path but DATASET_ROOT is not set")
    resolved = Path(posixpath.normpath(str(dataset_root / path)))
    if not is_within(resolved, dataset_root):
        raise DatasetError(f"data_yaml {text[:200]!r} points outside DATASET_ROOT ({dataset_root})")
    return LocalRef(resolved)


def normalize_url(url: str) -> str:
    """A stable identity for a URL: lower-case scheme and host, no default port, no volatile query tokens."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    netloc = host if port is None or port == _DEFAULT_PORTS.get(scheme) else f"{host}:{port}"
    path = quote(posixpath.normpath(unquote(parts.path or "/")), safe="/")
    query = sorted(
        (k, v)
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
        if k.lower() not in VOLATILE_QUERY_KEYS
    )
    return urlunsplit((scheme, netloc, path, urlencode(query), ""))


def _storage_uri(text: str, default_bucket: str) -> StorageRef:
    raw = text[len("storage:") :].lstrip("/")
    bucket, sep, path = raw.partition("/")
    if not sep:
        # The old trainer read `storage:data.yaml` as an object in the datasets bucket.
        bucket, path = default_bucket, raw
    return _storage(bucket, path, "uri", None, None, text)


def _http(text: str) -> HttpRef | StorageRef:
    parts = urlsplit(text)
    if not parts.hostname:
        raise DatasetError(f"dataset URL has no host: {text[:200]}")
    match = _STORAGE_PATH.match(parts.path)
    if match is None:
        ref = HttpRef(text)
        if not ref.yaml_name:
            raise DatasetError(f"dataset URL must name the YAML file, not a folder: {ref.display}")
        return ref
    rest = match.group("rest")
    first, _, remainder = rest.partition("/")
    kind = _STORAGE_KINDS.get(first)
    if kind is None:
        kind, remainder = "authenticated", rest
    bucket, _, path = remainder.partition("/")
    origin = urlunsplit((parts.scheme.lower(), parts.netloc.lower(), match.group("prefix"), "", ""))
    return _storage(unquote(bucket), unquote(path), kind, text, origin, f"{origin}/storage/v1/object/{rest}")


def _storage(
    bucket: str, path: str, kind: StorageUrlKind, url: str | None, origin: str | None, shown: str
) -> StorageRef:
    shown = shown[:200]
    if not bucket or "\\" in bucket or bucket in (".", ".."):
        raise DatasetError(f"storage dataset has no valid bucket: {shown}")
    clean = join_rel("", path, f"storage object {shown}")
    if not clean or clean.endswith("/"):
        raise DatasetError(f"storage dataset must name the YAML object: {shown}")
    return StorageRef(bucket=bucket, path=clean, url_kind=kind, url=url, origin=origin)
