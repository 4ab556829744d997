"""Supabase backend: PostgREST store, Realtime events, Storage artifacts and datasets, one client."""

from __future__ import annotations

import httpx
from realtime import AsyncRealtimeClient
from supabase import AsyncClient, AsyncClientOptions, acreate_client

from agent.backends import Backends
from agent.backends.supabase.blobs import SupabaseBlobs
from agent.backends.supabase.events import RealtimeFactory, SupabaseEvents, Tuning, hint_from_change
from agent.backends.supabase.rows import parse_row
from agent.backends.supabase.sources import StorageSource, storage_sources
from agent.backends.supabase.store import SupabaseStore
from agent.backends.supabase.transport import ServerUnavailable, http_client
from agent.config import Settings
from agent.domain.errors import BackendError, MissingPrivilege
from agent.domain.redact import redact

__all__ = [
    "ServerUnavailable",
    "StorageSource",
    "SupabaseBackends",
    "SupabaseBlobs",
    "SupabaseEvents",
    "SupabaseStore",
    "Tuning",
    "connect_client",
    "hint_from_change",
    "open_supabase",
    "parse_row",
    "realtime_factory",
    "storage_sources",
]


SupabaseBackends = Backends
ECHO_HEARTBEATS = 3


async def connect_client(url: str, key: str, http: httpx.AsyncClient) -> AsyncClient:
    """The supabase async client for a service-role key: no session, no token refresh, no client retries."""
    options = AsyncClientOptions(
        auto_refresh_token=False,
        persist_session=False,
        # The core owns the retry policy; PostgREST's own retry would hide outages behind 1-30 s sleeps.
        postgrest_client_retry=False,
        httpx_client=http,
    )
    return await acreate_client(url, key, options)


def realtime_factory(
    client: AsyncClient, *, timeout: int = 10, max_retries: int = 5, initial_backoff: float = 0.5
) -> RealtimeFactory:
    """Fresh realtime clients for the events watchdog, built as the supabase client builds its own."""

    def make() -> AsyncRealtimeClient:
        realtime = AsyncRealtimeClient(
            str(client.realtime_url),
            token=client.supabase_key,
            auto_reconnect=True,
            max_retries=max_retries,
            initial_backoff=initial_backoff,
            timeout=timeout,
        )
        client.realtime = realtime  # so that client.channel() and friends use the live one
        return realtime

    return make


async def open_supabase(settings: Settings, *, tuning: Tuning | None = None) -> SupabaseBackends:
    """Connect, check the schema, make sure the artifacts bucket exists, and assemble the backends."""
    url, key = settings.supabase_url, settings.supabase_service_role_key
    if not url or not key:
        raise BackendError("the supabase backend needs SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY")
    http = http_client()
    try:
        try:
            client = await connect_client(url, key, http)
        except Exception as exc:  # the client validates the URL and key with its own exception types
            raise BackendError(
                f"cannot use SUPABASE_URL/SUPABASE_SERVICE_ROLE_KEY: {redact(str(exc))}"
            ) from exc
        store = SupabaseStore(client)
        try:
            await store.probe()
        except MissingPrivilege:
            raise  # the schema is there: its message names the grant that is missing
        except BackendError as exc:
            raise BackendError(
                f"{exc}: apply the saturnos-agent schema (the SQL of `saturnos-agent migrate`) to the project"
            ) from exc
        blobs = SupabaseBlobs(
            client.storage,
            settings.supabase_artifacts_bucket,
            settings.artifact_url_mode,
            settings.signed_url_ttl,
        )
        await blobs.ensure_bucket()
        # Trusted like WEIGHTS_DIR, so it must be a bucket the web app's roles cannot write.
        models = None
        if settings.supabase_models_bucket:
            models = SupabaseBlobs(client.storage, settings.supabase_models_bucket)
        events = SupabaseEvents(
            realtime_factory(client),
            topic=f"saturnos-agent:{settings.worker_id}",
            worker_id=settings.worker_id,
            # The registry row is written every HEARTBEAT_INTERVAL: three missed echoes mean a dead stream.
            echo_within=ECHO_HEARTBEATS * settings.heartbeat_interval,
            tuning=tuning,
        )
    except BaseException:
        await http.aclose()
        raise
    return SupabaseBackends(
        store=store,
        admin=store,
        events=events,
        blobs=blobs,
        closers=[http.aclose],
        dataset_sources=storage_sources(client.storage, http, url),
        models=models,
    )
