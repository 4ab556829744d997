"""Where a row may point the agent for its dataset: the datasets' side of the trust boundary.

A row is written by anyone who holds the web app's public key, so its `data_yaml`, the dataset
YAML, every listing and every downloaded file are untrusted. Trusted are the operator's settings:
the folders local datasets may come from (DATASET_ROOT, ALLOWED_DATASET_ROOTS), the Storage
buckets datasets may come from (SUPABASE_DATASETS_BUCKET, ALLOWED_DATASET_BUCKETS), and whether
dataset servers on private networks may be reached (ALLOW_PRIVATE_DATASET_URLS). On the embedded
backend the person who submits is the operator, so local paths are free there unless a root is set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from agent.datasets.paths import is_within
from agent.domain.errors import DatasetError

Backend = Literal["supabase", "postgres", "embedded"]

ROOT_SETTINGS = "DATASET_ROOT or ALLOWED_DATASET_ROOTS"
BUCKET_SETTINGS = "SUPABASE_DATASETS_BUCKET or ALLOWED_DATASET_BUCKETS"


@dataclass(frozen=True, slots=True)
class SourcePolicy:
    """The operator's rules for dataset sources; the defaults are the strict ones."""

    roots: tuple[Path, ...] = ()  # folders local datasets may come from (absolute)
    confine_local: bool = True  # False: any local path (the embedded backend without a root)
    allow_private_urls: bool = False
    buckets: tuple[str, ...] = ("datasets",)
    storage_host: str | None = None  # host[:port] of SUPABASE_URL: its URLs are Storage, not HTTP
    _real_roots: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_real_roots", tuple(os.path.realpath(r) for r in self.roots))

    @classmethod
    def for_backend(
        cls,
        backend: Backend,
        roots: tuple[Path, ...],
        *,
        allow_private_urls: bool,
        buckets: tuple[str, ...],
        supabase_url: str | None,
    ) -> SourcePolicy:
        return cls(
            roots=roots,
            confine_local=backend != "embedded" or bool(roots),
            allow_private_urls=allow_private_urls,
            buckets=buckets,
            storage_host=host_of(supabase_url) if supabase_url else None,
        )

    @property
    def real_roots(self) -> tuple[str, ...]:
        return self._real_roots

    def check_local_yaml(self, path: Path, shown: str) -> None:
        """A local YAML must resolve (symlinks followed) inside an allowed folder when confined."""
        shown = shorten(shown)
        if not self.confine_local:
            return
        if not self.roots:
            raise DatasetError(
                f"local dataset paths are not accepted by this agent ({shown}): the operator must set "
                f"{ROOT_SETTINGS} to the folders datasets may come from, or use a storage: or https:// URL"
            )
        if not self.within_roots(path):
            raise DatasetError(f"data_yaml {shown} is outside the dataset folders ({ROOT_SETTINGS})")

    def within_roots(self, path: Path | str) -> bool:
        real = os.path.realpath(path)
        return any(is_within(Path(real), Path(root)) for root in self._real_roots)

    def check_bucket(self, bucket: str, shown: str) -> None:
        if bucket not in self.buckets:
            raise DatasetError(
                f"{shown}: bucket {bucket[:100]!r} is not a dataset bucket of this agent ({BUCKET_SETTINGS})"
            )

    def is_storage_host(self, url: str) -> bool:
        return self.storage_host is not None and host_of(url) == self.storage_host


def host_of(url: str) -> str:
    """host[:port] of a URL, lower-cased, without a default port."""
    parts = urlsplit(url.strip())
    host = (parts.hostname or "").lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    default = {"http": 80, "https": 443}.get(parts.scheme.lower())
    return host if port is None or port == default else f"{host}:{port}"


def shorten(value: object, limit: int = 200) -> str:
    """`value` for a message: its repr, at most `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
