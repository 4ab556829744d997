"""Realtime: Phoenix channels over a websocket, pushing `postgres_changes` from the change feed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from aiohttp import WSCloseCode, WSMsgType, web
from psycopg import sql
from psycopg.types.json import Jsonb

from tests.standin.auth import TokenError, verify
from tests.standin.changes import Change
from tests.standin.db import PUBLICATION, Pool
from tests.standin.faults import Faults
from tests.standin.quota import EventQuota
from tests.standin.realtime_params import Binding, Filter, parse_binding

log = logging.getLogger(__name__)

IDLE_TIMEOUT = 60.0  # Phoenix closes a websocket that sends nothing (not even a heartbeat) this long
PRIVATE_ONLY = "PrivateOnly: This project only allows private channels"
# A tenant's max_channels_per_client (100 by default): the join past it is refused with this.
TOO_MANY_CHANNELS = "ChannelRateLimitReached: Too many channels"
# A tenant's max_joins_per_second (100 by default, averaged over 5 s ticks, 12 of them): while
# over it, a join is refused with this and its socket is disconnected (realtime_channel.ex).
TOO_MANY_JOINS = "ClientJoinRateLimitReached: Too many joins per second"
UNAUTHORIZED = "Error 401: Unauthorized"


@dataclass
class Frame:
    topic: str
    event: str
    payload: Any
    ref: str | None = None
    join_ref: str | None = None


class V1Serializer:
    """Phoenix.Socket.V1.JSONSerializer: objects with topic, event, payload, ref."""

    def encode(self, frame: Frame) -> str:
        return json.dumps(
            {"topic": frame.topic, "event": frame.event, "payload": frame.payload, "ref": frame.ref}
        )

    def decode(self, text: str) -> Frame:
        msg = json.loads(text)
        return Frame(
            msg["topic"], msg["event"], msg.get("payload") or {}, msg.get("ref"), msg.get("join_ref")
        )


class V2Serializer:
    """Phoenix.Socket.V2.JSONSerializer: arrays [join_ref, ref, topic, event, payload]."""

    def encode(self, frame: Frame) -> str:
        return json.dumps([frame.join_ref, frame.ref, frame.topic, frame.event, frame.payload])

    def decode(self, text: str) -> Frame:
        join_ref, ref, topic, event, payload = json.loads(text)
        return Frame(topic, event, payload or {}, ref, join_ref)


class SubscribeError(Exception):
    """Realtime could not create the subscriptions of a channel."""


class Channel:
    """One joined `realtime:<name>` topic on one socket."""

    def __init__(
        self, conn: Connection, topic: str, join_ref: str | None, config: dict[str, Any], role: str
    ) -> None:
        self.conn = conn
        self.topic = topic
        self.role = role  # the subscriber's role: what apply_rls checks its changes against
        self.name = topic.removeprefix("realtime:")
        self.join_ref = join_ref
        broadcast = _object(config.get("broadcast"))
        self.broadcast_self = bool(broadcast.get("self"))
        self.broadcast_ack = bool(broadcast.get("ack"))
        changes = config.get("postgres_changes")
        self.bindings: list[Binding] = (
            [parse_binding(p) for p in changes if p is not None] if isinstance(changes, list) else []
        )
        self.closed = False
        self._task: asyncio.Task[None] | None = None

    def push(self, event: str, payload: Any, ref: str | None = None) -> None:
        self.conn.push(Frame(self.topic, event, payload, ref, self.join_ref))

    def fastlane(self, event: str, payload: Any) -> None:
        """A push from outside the channel process (changes, broadcasts): no join ref, no ref."""
        self.conn.push(Frame(self.topic, event, payload))

    def push_system(self, extension: str, status: str, message: str) -> None:
        self.push(
            "system", {"channel": self.name, "extension": extension, "status": status, "message": message}
        )

    def subscribe(self, work: Awaitable[None]) -> None:
        if self._task is not None:
            self._task.cancel()
        self._task = asyncio.ensure_future(work)

    def close(self) -> None:
        self.closed = True
        for binding in self.bindings:
            binding.active = False
        if self._task is not None:
            self._task.cancel()


class Connection:
    """One websocket: its channels and an ordered outgoing queue that faults can stall."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        transport: asyncio.Transport | None,
        serializer: V1Serializer | V2Serializer,
        token: str,
        faults: Faults,
    ) -> None:
        self.ws = ws
        self.serializer = serializer
        self.token = token
        self.channels: dict[str, Channel] = {}
        self._transport = transport
        self._faults = faults
        self._out: asyncio.Queue[str] = asyncio.Queue()
        self._closing: asyncio.Future[bool] | None = None
        self._writer = asyncio.create_task(self._write())

    def push(self, frame: Frame) -> None:
        if not self._writer.done():
            self._out.put_nowait(self.serializer.encode(frame))

    def reply(self, frame: Frame, status: str, response: dict[str, Any]) -> None:
        self.push(
            Frame(
                frame.topic, "phx_reply", {"status": status, "response": response}, frame.ref, frame.join_ref
            )
        )

    async def _write(self) -> None:
        while True:
            text = await self._out.get()
            while (stall := self._faults.stall_remaining()) > 0:
                await asyncio.sleep(stall)
            try:
                await self.ws.send_str(text)
            except (ConnectionError, RuntimeError):
                return
            finally:
                self._out.task_done()

    def disconnect(self) -> None:
        """Close the socket once what is queued has been sent, as Phoenix's `disconnect` does."""

        async def after_flush() -> bool:
            await self._out.join()
            return await self.ws.close(code=WSCloseCode.GOING_AWAY)

        self._closing = asyncio.ensure_future(after_flush())

    def drop(self) -> None:
        """Cut the connection without a close frame, as a network failure does."""
        if self._transport is not None:
            self._transport.abort()
        else:
            self._closing = asyncio.ensure_future(self.ws.close(code=WSCloseCode.ABNORMAL_CLOSURE))

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()
        self.channels.clear()
        self._writer.cancel()


class Realtime:
    """The `/realtime/v1/websocket` endpoint and the delivery of captured changes to its channels."""

    def __init__(
        self,
        pool: Pool,
        faults: Faults,
        jwt_secret: str,
        sync_triggers: Callable[[], Awaitable[None]],
        *,
        quota: EventQuota | None = None,
        private_only: bool = False,
        max_channels_per_client: int = 100,
        max_joins_per_second: float | None = 100.0,
    ) -> None:
        self._pool = pool
        self._faults = faults
        self._secret = jwt_secret
        self._sync_triggers = sync_triggers
        self._connections: set[Connection] = set()
        self.joins = 0  # joins answered ok, over the server's life
        self.quota = quota or EventQuota()
        self.private_only = private_only  # the project's "allow public access to channels" turned off
        self.max_channels_per_client = max_channels_per_client  # per socket, as Realtime counts them
        self.join_rate = EventQuota(max_joins_per_second, tick=5.0, window=12)  # the tenant's joins
        self._shadow: list[tuple[Binding, int]] = []
        faults._drop_subscriptions = self.drop_subscriptions

    @property
    def connections(self) -> int:
        return len(self._connections)

    def close_channels(self, message: str = "Server requested shutdown") -> int:
        """Shut every channel down as Realtime does (system error, then phx_close); clients never rejoin."""
        channels = [ch for conn in list(self._connections) for ch in list(conn.channels.values())]
        for channel in channels:
            channel.push_system("system", "error", message)
            self._close_channel(channel)
        return len(channels)

    def drop_subscriptions(self) -> int:
        """Forget every channel's subscriptions, as a cold restart of the change capture does.

        Channels stay joined and nobody is told; nothing is delivered until a channel joins again.
        """
        dropped = 0
        for conn in list(self._connections):
            for channel in conn.channels.values():
                for binding in channel.bindings:
                    dropped += binding.active
                    binding.active = False
        return dropped

    def add_shadow(self, params: list[dict[str, Any]], copies: int = 1) -> None:
        """Bindings counted (into `quota.shadow_counted`) as if `copies` subscribers had them, never sent.

        A benchmark compares the counts of the bindings it runs with those of other bindings on the
        same changes. Shadow bindings are matched on schema, table and event only, as unfiltered.
        """
        for p in params:
            binding = parse_binding(p)
            if binding.error is None:
                self._shadow.append((binding, copies))

    def drop_all(self) -> int:
        conns = list(self._connections)
        for conn in conns:
            conn.drop()
        return len(conns)

    async def close_all(self) -> None:
        for conn in list(self._connections):
            with contextlib.suppress(Exception):
                await conn.ws.close(code=WSCloseCode.GOING_AWAY)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """The websocket handshake (apikey checked as Realtime's UserSocket does) and the frame loop."""
        if self._faults.realtime_refused:
            return web.json_response({"error": "Realtime is unavailable"}, status=503)
        token = request.query.get("apikey") or request.headers.get("x-api-key")
        try:
            verify(token, self._secret)
        except TokenError as exc:
            return web.json_response({"error": exc.message}, status=401)
        serializer = V2Serializer() if request.query.get("vsn", "1.0.0").startswith("2.") else V1Serializer()
        ws = web.WebSocketResponse(autoping=True)
        transport = request.transport
        await ws.prepare(request)
        conn = Connection(ws, transport, serializer, str(token), self._faults)
        self._connections.add(conn)
        try:
            while True:
                try:
                    msg = await ws.receive(timeout=IDLE_TIMEOUT)
                except TimeoutError:
                    await ws.close()
                    break
                if msg.type == WSMsgType.TEXT:
                    self._on_text(conn, msg.data)
                elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                    break
        finally:
            self._connections.discard(conn)
            conn.close()
        return ws

    def _on_text(self, conn: Connection, text: str) -> None:
        try:
            frame = conn.serializer.decode(text)
        except (ValueError, KeyError, TypeError):
            log.info("stand-in realtime: undecodable frame %r", text[:200])
            return
        if frame.topic == "phoenix" and frame.event == "heartbeat":
            conn.reply(frame, "ok", {})
            return
        if frame.event == "phx_join":
            self._join(conn, frame)
            return
        channel = conn.channels.get(frame.topic)
        if channel is None:
            conn.reply(frame, "error", {"reason": "unmatched topic"})
            return
        payload = frame.payload if isinstance(frame.payload, dict) else {}
        if frame.event == "phx_leave":
            conn.reply(frame, "ok", {})
            self._close_channel(channel)
        elif frame.event == "access_token":
            self._access_token(channel, payload.get("access_token"))
        elif frame.event == "broadcast":
            self._broadcast(channel, frame)
        elif frame.event == "presence":
            conn.reply(frame, "ok", {})
        # Anything else is ignored, as Realtime's catch-all handle_in does.

    def _join(self, conn: Connection, frame: Frame) -> None:
        topic = frame.topic
        if not topic.startswith("realtime:"):
            conn.reply(frame, "error", {"reason": "unmatched topic"})
            return
        if topic == "realtime:":
            conn.reply(frame, "error", {"reason": "TopicNameRequired: You must provide a topic name"})
            return
        if self.join_rate.triggered:
            conn.reply(frame, "error", {"reason": TOO_MANY_JOINS})
            conn.disconnect()
            return
        self.join_rate.add(1)
        if topic not in conn.channels and len(conn.channels) >= self.max_channels_per_client:
            conn.reply(frame, "error", {"reason": TOO_MANY_CHANNELS})
            return
        old = conn.channels.pop(topic, None)
        if old is not None:
            old.close()  # Phoenix replaces a duplicate join silently
        payload = frame.payload if isinstance(frame.payload, dict) else {}
        token = payload.get("access_token") or payload.get("user_token") or conn.token
        try:
            claims = verify(token if isinstance(token, str) else None, self._secret)
        except TokenError as exc:
            conn.reply(frame, "error", {"reason": f"Unauthorized: {exc.message}"})
            return
        config = _object(payload.get("config"))
        role = str(claims.get("role") or "anon")
        if config.get("private") is not True and self.private_only:
            conn.reply(frame, "error", {"reason": PRIVATE_ONLY})
            return
        if config.get("private") is True and role != "service_role":
            # Private channels are authorized by policies on realtime.messages; the stand-in has none.
            reason = f"Unauthorized: You do not have permissions to read from this Channel topic: {topic}"
            conn.reply(frame, "error", {"reason": reason})
            return
        channel = Channel(conn, topic, frame.join_ref or frame.ref, config, role)
        conn.channels[topic] = channel
        self.joins += 1
        conn.reply(frame, "ok", {"postgres_changes": [{**b.params, "id": b.id} for b in channel.bindings]})
        if _object(config.get("presence")).get("enabled"):
            channel.push("presence_state", {})
        if channel.bindings:
            channel.subscribe(self._subscribe(channel))

    def _close_channel(self, channel: Channel) -> None:
        channel.close()
        if channel.conn.channels.get(channel.topic) is channel:
            del channel.conn.channels[channel.topic]
        channel.push("phx_close", {}, ref=channel.join_ref)

    def _access_token(self, channel: Channel, token: Any) -> None:
        if not isinstance(token, str):
            return
        try:
            verify(token, self._secret)
        except TokenError as exc:
            channel.push_system("system", "error", exc.message)
            self._close_channel(channel)
            return
        if channel.bindings:
            # Realtime re-creates the subscriptions after a random 1-3 s backoff, then says so again.
            channel.subscribe(self._subscribe(channel, delay=random.uniform(1.0, 3.0)))

    def _broadcast(self, channel: Channel, frame: Frame) -> None:
        for conn in list(self._connections):
            other = conn.channels.get(channel.topic)
            if other is None or (other is channel and not channel.broadcast_self):
                continue
            other.fastlane("broadcast", frame.payload)
        if channel.broadcast_ack:
            channel.conn.reply(frame, "ok", {})

    async def _subscribe(self, channel: Channel, delay: float = 0.0) -> None:
        """Create the channel's subscriptions, then say "Subscribed to PostgreSQL" (or the error)."""
        if delay:
            await asyncio.sleep(delay)
        try:
            await self._sync_triggers()
            entities = await self._resolve(channel.bindings)
        except SubscribeError as exc:
            channel.push_system("postgres_changes", "error", str(exc))
            return
        except psycopg.Error as exc:
            channel.push_system("postgres_changes", "error", f"Unable to subscribe to PostgreSQL: {exc}")
            return
        await self._faults.wait_subscribed()
        if channel.closed:
            return
        # Realtime delivers what commits after the subscription exists; the capture id marks that point.
        since = await self._capture_position()
        for binding, found in zip(channel.bindings, entities, strict=True):
            binding.entities = found
            if not binding.active:
                binding.since = since
            binding.active = True
        channel.push_system("postgres_changes", "ok", "Subscribed to PostgreSQL")

    async def _capture_position(self) -> int:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "select case when is_called then last_value else 0 end from standin.changes_id_seq"
            )
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def _resolve(self, bindings: list[Binding]) -> list[set[tuple[str, str]]]:
        """The published tables of each binding; all or nothing, as Realtime's subscription insert."""
        resolved = []
        async with self._pool.connection() as conn, conn.transaction():
            for binding in bindings:
                if binding.error is not None:
                    raise SubscribeError(binding.error)
                cur = await conn.execute(
                    "select schemaname, tablename from pg_publication_tables where pubname = %s"
                    " and (%s = '*' or schemaname = %s) and (%s = '*' or tablename = %s)",
                    [PUBLICATION, binding.schema, binding.schema, binding.table, binding.table],
                )
                found = {(str(s), str(t)) for s, t in await cur.fetchall()}
                if not found:
                    raise SubscribeError(
                        "Unable to subscribe to changes with given parameters. Please check Realtime is"
                        f" enabled for the given connect parameters: [{_params_to_log(binding)}]"
                    )
                try:
                    for schema, table in sorted(found):
                        for f in binding.filters:
                            await conn.execute(
                                "select standin.check_filter(format('%%I.%%I', %s::text, %s::text)::regclass,"
                                " %s, %s, %s)",
                                [schema, table, f.column, f.op, f.value],
                            )
                except psycopg.Error as exc:
                    raise SubscribeError(
                        "Unable to subscribe to changes with given parameters. An exception happened so"
                        f" please check your connect parameters: [{_params_to_log(binding)}]."
                        f" Exception: ERROR {exc.sqlstate} {exc.diag.message_primary}"
                    ) from exc
                resolved.append(found)
        return resolved

    async def deliver(self, changes: list[Change]) -> None:
        """Push each change, in order, to every channel with bindings that want it, within the quota."""
        access = _Access(self._pool)
        for change in changes:
            for binding, copies in self._shadow:
                wanted = binding.event in ("*", change.type)
                if wanted and (change.schema, change.table) in _entities(binding):
                    self.quota.shadow_counted += copies
            if self.quota.triggered:
                self.quota.skip()
                continue
            for conn in list(self._connections):
                for channel in list(conn.channels.values()):
                    await self._deliver_to(channel, change, access)

    async def _deliver_to(self, channel: Channel, change: Change, access: _Access) -> None:
        groups: dict[tuple[str, ...] | None, list[int]] = {}
        for binding in channel.bindings:
            if not binding.wants(change.id, change.schema, change.table, change.type):
                continue
            if binding.filters and not await self._passes(binding, change):
                continue
            ids = groups.setdefault(tuple(binding.select) if binding.select else None, [])
            if binding.id not in ids:
                ids.append(binding.id)
        if not groups:
            return
        rights = await access.rights(channel.role, change.schema, change.table)
        if change.type != "DELETE" and change.has_pk and not rights.select_pk:
            ids = [i for group in groups.values() for i in group]
            self.quota.add(len(ids))
            channel.fastlane("postgres_changes", {"ids": ids, "data": change.unauthorized()})
            return
        visible_or_unchecked = not (rights.row_security and change.type != "DELETE" and change.has_pk)
        if not visible_or_unchecked and not await access.visible(channel.role, change):
            return
        for select, ids in groups.items():
            data = change.data(list(select) if select else None, keys_only_old=rights.row_security)
            self.quota.add(len(ids))
            channel.fastlane("postgres_changes", {"ids": ids, "data": data})

    async def _passes(self, binding: Binding, change: Change) -> bool:
        # Realtime checks an INSERT or UPDATE against the new row, a DELETE against the old row's
        # identity (the primary key by default): a filter on a column that is not there fails closed.
        row = change.old_record if change.type == "DELETE" else change.record
        if row is None:
            return False
        if any(f.column not in row for f in binding.filters):
            return False
        quick = _quick_match(binding.filters, row, change.columns)
        if quick is not None:
            return quick
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "select standin.filters_match(format('%%I.%%I', %s::text, %s::text)::regclass, %s, %s)",
                [change.schema, change.table, Jsonb(row), Jsonb([f.as_row() for f in binding.filters])],
            )
            result = await cur.fetchone()
            await conn.rollback()
        return bool(result and result[0])


@dataclass(frozen=True)
class _Rights:
    select_pk: bool  # the role may select every primary key column (else: Error 401)
    row_security: bool  # row level security applies to the role on this table


class _Access:
    """What apply_rls asks of the database for one batch: a role's rights, a row's visibility."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._rights: dict[tuple[str, str, str], _Rights] = {}

    async def rights(self, role: str, schema: str, table: str) -> _Rights:
        key = (role, schema, table)
        if key not in self._rights:
            async with self._pool.connection() as conn:
                cur = await conn.execute(
                    """
                    select coalesce(bool_and(has_column_privilege(%s, c.oid, a.attname, 'SELECT')), true),
                           c.relrowsecurity and not coalesce((select rolbypassrls from pg_roles
                                                              where rolname = %s), false)
                    from pg_class c
                    join pg_namespace n on n.oid = c.relnamespace
                    left join pg_index i on i.indrelid = c.oid and i.indisprimary
                    left join pg_attribute a on a.attrelid = c.oid and a.attnum = any(i.indkey)
                    where n.nspname = %s and c.relname = %s
                    group by c.oid, c.relrowsecurity
                    """,
                    [role, role, schema, table],
                )
                row = await cur.fetchone()
                await conn.rollback()
            self._rights[key] = _Rights(bool(row and row[0]), bool(row and row[1]))
        return self._rights[key]

    async def visible(self, role: str, change: Change) -> bool:
        """Whether the role sees the changed row through its policies, as walrus_rls_stmt asks."""
        record = change.record or {}
        keys = [c for c in change.primary_key if c in record]
        if not keys:
            return False
        query = sql.SQL("select exists (select 1 from {} where {})").format(
            sql.Identifier(change.schema, change.table),
            sql.SQL(" and ").join(sql.SQL("{}::text = %s").format(sql.Identifier(k)) for k in keys),
        )
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute("select set_config('role', %s, true)", [role])
            await conn.execute(
                "select set_config('request.jwt.claims', %s, true)", [json.dumps({"role": role})]
            )
            try:
                cur = await conn.execute(query, [str(record[k]) for k in keys])
                row = await cur.fetchone()
            except psycopg.Error:
                return False
        return bool(row and row[0])


def _entities(binding: Binding) -> set[tuple[str, str]] | tuple[tuple[str, str], ...]:
    return binding.entities or ((binding.schema, binding.table),)


_TRUE = frozenset({"t", "true", "y", "yes", "on", "1"})
_FALSE = frozenset({"f", "false", "n", "no", "off", "0"})


def _quick_match(filters: list[Filter], row: dict[str, Any], columns: list[dict[str, str]]) -> bool | None:
    """`eq`/`neq` on text, uuid and boolean columns, decided here as Postgres would; None: ask it."""
    types = {c["name"]: c["type"] for c in columns}
    for f in filters:
        kind, value = types.get(f.column), row.get(f.column)
        if f.op not in ("eq", "neq") or kind not in ("text", "varchar", "uuid", "bool"):
            return None
        if value is None:
            equal = None
        elif kind == "bool":
            wanted = f.value.strip().lower()
            if wanted not in _TRUE | _FALSE or not isinstance(value, bool):
                return None
            equal = value is (wanted in _TRUE)
        elif kind == "uuid":
            equal = str(value).replace("-", "").lower() == f.value.strip().replace("-", "").lower()
        else:
            equal = str(value) == f.value
        result = None if equal is None else (equal if f.op == "eq" else not equal)
        if f.negate and result is not None:
            result = not result
        if not result:
            return False
    return True


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _params_to_log(binding: Binding) -> str:
    filters = ", ".join(f'{{"{f.column}", "{f.op}", "{f.value}"}}' for f in binding.filters)
    select = binding.select if binding.select is not None else "nil"
    return (
        f"event: {binding.event}, schema: {binding.schema}, table: {binding.table},"
        f" filters: [{filters}], select: {select}"
    )
