"""The stand-in: one local HTTP + WebSocket server playing a Supabase project's REST, Realtime and Storage."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import psycopg
from aiohttp import web
from psycopg import sql

from tests.standin.auth import DEFAULT_JWT_SECRET, api_key
from tests.standin.changes import ChangeFeed
from tests.standin.db import PUBLICATION, Capabilities, Pool, prepare_database
from tests.standin.faults import Faults, Service
from tests.standin.quota import EventQuota
from tests.standin.realtime import Realtime
from tests.standin.rest import Rest
from tests.standin.storage import MAX_UPLOAD_BYTES, Storage
from tests.standin.storage_store import ObjectStore

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS",
    "Access-Control-Allow-Headers": "*",
    "Access-Control-Expose-Headers": "Content-Range, Content-Profile, Preference-Applied, ETag",
}


class StandIn:
    """A local Supabase project backed by a real Postgres database and a storage folder."""

    def __init__(
        self,
        database_url: str,
        storage_dir: str | Path,
        *,
        jwt_secret: str = DEFAULT_JWT_SECRET,
        host: str = "127.0.0.1",
        port: int = 0,
        schemas: tuple[str, ...] = ("public",),
        max_events_per_second: float | None = None,
        quota_tick: float = 1.0,
        quota_window: int = 10,
        private_only: bool = False,
        max_channels_per_client: int = 100,
        max_joins_per_second: float | None = 100.0,
    ) -> None:
        self.database_url = database_url
        self.storage_dir = Path(storage_dir)
        self.jwt_secret = jwt_secret
        self.anon_key = api_key(jwt_secret, "anon")
        self.service_role_key = api_key(jwt_secret, "service_role")
        self.faults = Faults()
        self.storage = ObjectStore(self.storage_dir)
        self.capabilities = Capabilities(role_switching=False, event_trigger=False)
        self._host = host
        self._port = port
        self._schemas = schemas
        self._pool = Pool(database_url)
        self.realtime = Realtime(
            self._pool,
            self.faults,
            jwt_secret,
            self.sync_triggers,
            quota=EventQuota(max_events_per_second, tick=quota_tick, window=quota_window),
            private_only=private_only,
            max_channels_per_client=max_channels_per_client,
            max_joins_per_second=max_joins_per_second,
        )
        self._feed: ChangeFeed | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    @property
    def url(self) -> str:
        """The project URL, as SUPABASE_URL would hold it."""
        return f"http://{self._host}:{self._port}"

    @property
    def port(self) -> int:
        return self._port

    async def start(self) -> None:
        """Prepare the database, start the change feed, and listen."""
        self.capabilities = await prepare_database(self.database_url)
        rest = Rest(
            self._pool,
            self.jwt_secret,
            role_switching=self.capabilities.role_switching,
            schemas=self._schemas,
        )
        storage = Storage(self.storage, self.jwt_secret)
        self._feed = ChangeFeed(
            self.database_url,
            self._pool,
            self.realtime.deliver,
            resync_triggers=not self.capabilities.event_trigger,
        )
        await self._feed.start()
        app = web.Application(middlewares=[self._middleware], client_max_size=MAX_UPLOAD_BYTES + 1024 * 1024)
        app.router.add_route("*", "/rest/v1/{tail:.*}", rest.handle)
        app.router.add_route("GET", "/realtime/v1/websocket", self.realtime.handle)
        app.router.add_route("*", "/storage/v1/{tail:.*}", storage.handle)
        app.router.add_route("GET", "/_standin/realtime/quota", self._quota)
        app.router.add_route("POST", "/_standin/realtime/quota/reset", self._quota_reset)
        app.router.add_route("POST", "/_standin/realtime/shadow", self._shadow)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        await self._listen(True)
        self.faults._drop_websockets = self.realtime.drop_all
        self.faults._close_channels = self.realtime.close_channels
        self.faults._set_listening = self._listen

    async def stop(self) -> None:
        """Close every connection and stop; the database and the folder stay as they are."""
        await self.realtime.close_all()
        if self._feed is not None:
            await self._feed.stop()
        if self._runner is not None:
            await self._runner.cleanup()
        self._site = None
        await self._pool.close()

    async def publish(self, *tables: str) -> None:
        """Add tables (`table` or `schema.table`) to `supabase_realtime`, as the dashboard's toggle does."""
        async with await psycopg.AsyncConnection.connect(self.database_url, autocommit=True) as conn:
            for table in tables:
                schema, _, name = table.rpartition(".")
                schema = schema or "public"
                cur = await conn.execute(
                    "select 1 from pg_publication_tables"
                    " where pubname = %s and schemaname = %s and tablename = %s",
                    [PUBLICATION, schema, name],
                )
                if await cur.fetchone() is None:
                    await conn.execute(
                        sql.SQL("alter publication {} add table {}").format(
                            sql.Identifier(PUBLICATION), sql.Identifier(schema, name)
                        )
                    )
            await conn.execute("select standin.sync_capture_triggers()")

    async def sync_triggers(self) -> None:
        """Put the capture trigger on the tables of the publication (the event trigger does it on DDL)."""
        async with self._pool.connection() as conn:
            await conn.execute("select standin.sync_capture_triggers()")
            await conn.commit()

    async def _listen(self, on: bool) -> None:
        assert self._runner is not None
        if on and self._site is None:
            site = web.TCPSite(self._runner, self._host, self._port, reuse_address=True)
            await site.start()
            self._site = site
            self._port = int(self._runner.addresses[0][1])
        elif not on and self._site is not None:
            await self._site.stop()
            self._site = None

    # The stand-in's own control routes, for benchmarks that run it as a separate process.

    async def _quota(self, request: web.Request) -> web.Response:
        quota = self.realtime.quota
        return web.json_response(
            {
                "max_events_per_second": quota.max_events_per_second,
                "elapsed": quota.elapsed,
                "counted": quota.counted,
                "skipped_changes": quota.skipped_changes,
                "shadow_counted": quota.shadow_counted,
                "average": quota.average,
                "triggered": quota.triggered,
                "connections": self.realtime.connections,
            }
        )

    async def _quota_reset(self, request: web.Request) -> web.Response:
        self.realtime.quota.reset()
        return web.json_response({})

    async def _shadow(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.realtime.add_shadow(list(body.get("params") or []), int(body.get("copies") or 1))
        return web.json_response({})

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "OPTIONS":
            return web.Response(status=204, headers=_CORS)
        service = _service(request.path)
        if service is not None:
            delay = self.faults.latency_of(service)
            if delay > 0:
                await asyncio.sleep(delay)
            status = self.faults.take_failure(service)
            if status is not None:
                return _injected_failure(service, status)
        response = await handler(request)
        if not response.prepared:
            response.headers.update(_CORS)
        return response


def _service(path: str) -> Service | None:
    if path.startswith("/rest/v1"):
        return "rest"
    if path.startswith("/storage/v1"):
        return "storage"
    if path.startswith("/realtime/v1"):
        return "realtime"
    return None


def _injected_failure(service: Service, status: int) -> web.Response:
    """A server-side failure in the shape each service's clients parse."""
    message = "Service unavailable (injected fault)"
    if service == "rest":
        body: dict[str, str | None] = {"code": "PGRST000", "details": None, "hint": None, "message": message}
    elif service == "storage":
        body = {"statusCode": str(status), "code": "InternalError", "error": "internal", "message": message}
    else:
        body = {"error": message}
    return web.json_response(body, status=status)
