"""Adapters: each implements the ports over one technology and translates its errors."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from agent.datasets.remote import SourceFactory
from agent.ports import BlobStore, RunAdmin, RunEvents, RunStore


@dataclass
class Backends:
    """One backend's implementations of the ports, and how to close them."""

    store: RunStore
    admin: RunAdmin
    events: RunEvents
    blobs: BlobStore
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    database_url: str | None = None
    # Remote dataset sources beyond plain HTTP (Supabase Storage), for the DatasetPreparer.
    dataset_sources: Mapping[str, SourceFactory] = field(default_factory=dict)
    # The operator's models bucket (SUPABASE_MODELS_BUCKET), when set.
    models: BlobStore | None = None

    async def close(self) -> None:
        for close in reversed(self.closers):
            with contextlib.suppress(Exception):
                await close()
