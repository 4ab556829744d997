"""RunEvents over Supabase Realtime `postgres_changes`, watched over because the stream has gaps.

Known gaps of Realtime and of realtime-py 2.34.1, and what this module does about each:

- Changes committed before the server's `system` "Subscribed to PostgreSQL" message are not
  delivered, although the join was answered (SUBSCRIBED) earlier. So the stream counts as healthy,
  and `on_subscribed` (the core's catch-up poll) runs, at every such message: once per (re)join,
  after the last change that could have been missed. A poll at SUBSCRIBED would run too early to
  see the changes of that window. A join with no such message within `postgres_timeout` is rebuilt.
- After `max_retries` failed reconnects the client gives up and stays silent with no socket
  (realtime/_async/client.py `connect`, the `raise` after the retry loop, inside its listen task):
  the watchdog rebuilds the whole client when the socket stays down past `reconnect_grace`.
- A channel the server closes (`phx_close`) is removed and never rejoined (channel.py `on_close`),
  and a join that keeps failing retries forever: the watchdog rebuilds the channel.
- The client sends its heartbeats with `ref: null` and ignores the replies (client.py `_heartbeat`
  and `_listen`, which routes frames by topic only), so a stalled socket goes unnoticed: the
  watchdog sends its own `phoenix` heartbeats with refs, through a channel object registered
  under the `phoenix` topic, and rebuilds the client when a reply is missing.
- A callback that raises unwinds the client's listen task and stops all delivery
  (client.py `_listen` calls `channel._handle_message` unguarded): every callback here catches
  everything and only enqueues.
- A cold restart of Realtime's change capture deletes the server-side subscriptions and tells no
  one, and a project over its event quota skips every change silently: the socket, the channel
  and the heartbeats all look fine. So the stream must prove it is alive: the agent's own write of
  its registry row, every HEARTBEAT_INTERVAL, idle or not, comes back through the
  `worker_id=eq.<me>` binding; with none back within `echo_within` (3 × HEARTBEAT_INTERVAL) the
  stream is unhealthy and the channel is rebuilt, and with it the feeds of held runs.
- A run held by this agent is followed on a channel of its own (a feed, see changes.py), joined
  after the claim. Changes before its "Subscribed to PostgreSQL" are not delivered, and that is
  when an unconditional claim by another worker races ours: at every such message the feed sends a
  CHECK hint, and the core reads the row.
- The server's complaints (`system` errors, refused joins, changes carrying `Error 401` or
  `Error 413`) are kept as `problems`, each logged once at WARNING in the server's words.
  realtime-py cannot parse an `Error 401` change (it has no commit_timestamp) and only logs it:
  its log record is read here for the frame.

Which bindings, and why they are filtered on the server: see changes.py.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loguru import logger
from realtime import AsyncRealtimeChannel, AsyncRealtimeClient, RealtimeSubscribeStates
from realtime._async.push import AsyncPush
from realtime.types import (
    PHOENIX_CHANNEL,
    ChannelEvents,
    RealtimeAcknowledgementStatus,
    RealtimePostgresChangesListenEvent,
)
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_never,
    wait_exponential_jitter,
)

from agent.backends.supabase.changes import (
    Binding,
    agent_bindings,
    change_data,
    change_errors,
    hint_from_change,
    is_own_write,
    is_progress_write,
    run_bindings,
)
from agent.domain.run import Hint
from agent.ports import HintSink

__all__ = [
    "SUBSCRIBED_TO_POSTGRES",
    "RealtimeFactory",
    "SupabaseEvents",
    "Tuning",
    "hint_from_change",
    "is_progress_write",
    "quiet_realtime_logging",
]

RealtimeFactory = Callable[[], AsyncRealtimeClient]
SUBSCRIBED_TO_POSTGRES = "Subscribed to PostgreSQL"
_UNPARSED = "Unrecognized message format "
_MAX_PROBLEMS = 16
_MAX_CAUSE = 300
_EVENTS = {e.value: e for e in RealtimePostgresChangesListenEvent}

# Frames realtime-py could not parse, routed by topic to the SupabaseEvents that joined it.
_unparsed_listeners: dict[str, Callable[[dict[str, Any]], None]] = {}


def _unparsed_frame(message: str) -> dict[str, Any] | None:
    """The frame in realtime-py's "Unrecognized message format '…'" log line, if it is one."""
    if not message.startswith(_UNPARSED):
        return None
    quoted = message[len(_UNPARSED) :].split("\n", 1)[0]
    try:
        text = ast.literal_eval(quoted)
        frame = json.loads(text) if isinstance(text, (str, bytes)) else None
    except (ValueError, SyntaxError):
        return None
    return frame if isinstance(frame, dict) else None


class _ToLoguru(logging.Handler):
    """realtime-py logs every failed reconnect at ERROR; the watchdog reports outages itself."""

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            message = record.getMessage()
            frame = _unparsed_frame(message)
            listener = _unparsed_listeners.get(str(frame.get("topic"))) if frame else None
            if frame is not None and listener is not None:
                listener(frame)
            logger.bind(library=record.name).debug(message)


def quiet_realtime_logging() -> None:
    """Route realtime-py's stdlib logging to loguru at DEBUG (idempotent)."""
    lib = logging.getLogger("realtime")
    if not any(isinstance(h, _ToLoguru) for h in lib.handlers):
        lib.addHandler(_ToLoguru())
    lib.propagate = False


@dataclass(frozen=True)
class Tuning:
    """Watchdog timings, in seconds."""

    check_interval: float = 0.5  # how often the watchdog looks at the client's state
    heartbeat_interval: float = 10.0  # own Phoenix heartbeats while subscribed
    heartbeat_timeout: float = 10.0  # a missing reply within this rebuilds the client
    reconnect_grace: float = 10.0  # the client's own reconnect may take this long
    rejoin_grace: float = 15.0  # a channel not joined for this long is rebuilt
    join_timeout: float = 15.0  # connect + phx_join + phx_reply
    postgres_timeout: float = 20.0  # phx_reply to "Subscribed to PostgreSQL"
    close_timeout: float = 3.0
    initial_backoff: float = 0.5  # between rebuilds that did not get back to subscribed
    max_backoff: float = 30.0
    stable_after: float = 5.0  # subscribed this long: the next outage starts backoff afresh
    feed_retry: float = 5.0  # a held run's feed that was closed or refused is joined again after this


@dataclass
class _Watch:
    """When each kind of outage of the current channel began (None: not in one)."""

    disconnected_at: float | None = None
    unjoined_at: float | None = None
    unready_at: float | None = None  # connected, but no changes flowing


def _server_words(error: Exception) -> str:
    """The server's message in a channel error: a system error's `message`, a refusal's `reason`."""
    text = str(error)
    try:
        payload = json.loads(text)
    except ValueError:
        return text
    if isinstance(payload, dict):
        for key in ("message", "reason"):
            if isinstance(payload.get(key), str):
                return str(payload[key])
    return text


@dataclass
class _Feed:
    """The channel that follows one held run on the current client."""

    run_id: str
    channel: AsyncRealtimeChannel
    since: float  # joined, or last seen not subscribed: not ready within postgres_timeout is a retry
    ready: bool = False
    failed_at: float | None = None


class _Rebuild(Exception):
    def __init__(self, scope: str, reason: str) -> None:
        super().__init__(reason)
        self.scope = scope  # "client" or "channel"
        self.reason = reason


class _Stable(Exception):
    """The stream went down after a stable period: rebuild at once, backoff from the start."""

    def __init__(self, rebuild: _Rebuild) -> None:
        super().__init__(rebuild.reason)
        self.rebuild = rebuild


class SupabaseEvents:
    """Hints from one Realtime channel per agent, with a watchdog that keeps it subscribed."""

    def __init__(
        self,
        make_client: RealtimeFactory,
        *,
        topic: str,
        worker_id: str | None = None,
        echo_within: float | None = None,
        tuning: Tuning | None = None,
    ) -> None:
        self._make_client = make_client
        self._topic = topic
        self._worker_id = worker_id
        self._bindings = agent_bindings(worker_id)
        # The liveness proof needs this agent's own writes to come back: its worker id's bindings.
        self._echo_within = echo_within if worker_id is not None else None
        self._t = tuning or Tuning()
        self._healthy = False
        self._log = logger.bind(topic=topic)
        self._sink: HintSink = lambda hint: None
        self._on_subscribed: Callable[[], None] = lambda: None
        self._client: AsyncRealtimeClient | None = None
        self._channel: AsyncRealtimeChannel | None = None
        self._probe: AsyncRealtimeChannel | None = None
        self._gen = 0  # callbacks of an older channel or client are ignored
        self._subscribed = False  # the current channel's last status was SUBSCRIBED
        self._last_error = ""  # the server's last complaint about the channel, for the outage log
        self._postgres_ready = False  # "Subscribed to PostgreSQL" since that SUBSCRIBED
        self._wake = asyncio.Event()
        self._down_since: float | None = None  # start of the current outage (or of the startup)
        self._ever_up = False
        self._outage_logged = False
        self._up_since: float | None = None
        self._subscriptions = 0
        self._rebuilds = 0
        self._probe_sent_at: float | None = None
        self._probe_replied = True
        self._probe_failed = False
        self._probe_epoch = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._ready_at = 0.0  # the last "Subscribed to PostgreSQL"
        self._echo_at = 0.0  # the last change of this agent's own rows
        self._echoes = 0
        self._last_payload: object = None
        self._problems: OrderedDict[str, float] = OrderedDict()  # cause -> wall time last seen
        self._followed: frozenset[str] = frozenset()
        self._feeds: dict[str, _Feed] = {}  # run id -> its channel on the current client
        self._feed_seq = 0

    @property
    def healthy(self) -> bool:
        return self._healthy

    @property
    def rebuilds(self) -> int:
        """How many times the watchdog rebuilt the channel or the client (for logs and tests)."""
        return self._rebuilds

    @property
    def subscriptions(self) -> int:
        """How many times changes started flowing ("Subscribed to PostgreSQL"), for logs and tests."""
        return self._subscriptions

    @property
    def echoes(self) -> int:
        """Changes of this agent's own rows that came back through the stream (for logs and tests)."""
        return self._echoes

    @property
    def problems(self) -> tuple[str, ...]:
        """Recent distinct causes the server gave (or the stream showed) for not delivering, oldest first."""
        return tuple(self._problems)

    @property
    def feeds(self) -> dict[str, bool]:
        """Held runs with a channel, and whether changes flow on it (for tests)."""
        return {run_id: feed.ready for run_id, feed in self._feeds.items()}

    def follow(self, run_ids: frozenset[str]) -> None:
        """Follow exactly these runs, each on a channel of its own; the watchdog joins and leaves."""
        self._followed = frozenset(run_ids)
        self._wake.set()

    def _problem(self, cause: str) -> None:
        """Keep a cause; the first time it is seen, log it at WARNING in the server's words."""
        cause = cause.strip()[:_MAX_CAUSE] or "unknown"
        known = cause in self._problems
        self._problems[cause] = time.time()
        self._problems.move_to_end(cause)
        while len(self._problems) > _MAX_PROBLEMS:
            self._problems.popitem(last=False)
        if not known:
            self._log.bind(cause=cause).warning("realtime problem: {}", cause)

    async def listen(self, sink: HintSink, on_subscribed: Callable[[], None]) -> None:
        """Stream hints until cancelled; rebuilds the channel or the client, with backoff, when unhealthy."""
        self._sink, self._on_subscribed = sink, on_subscribed
        quiet_realtime_logging()
        full_topic = f"realtime:{self._topic}"
        _unparsed_listeners[full_topic] = self._on_unparsed
        try:
            while True:
                # One AsyncRetrying per outage: a stream that was stable starts its backoff afresh.
                try:
                    async for attempt in AsyncRetrying(
                        retry=retry_if_exception_type(_Rebuild),
                        wait=wait_exponential_jitter(
                            initial=self._t.initial_backoff,
                            max=self._t.max_backoff,
                            jitter=self._t.initial_backoff,
                        ),
                        stop=stop_never,
                        before_sleep=self._rebuild,
                        reraise=True,
                    ):
                        with attempt:
                            await self._stream_once()
                except _Stable as stable:
                    self._up_since = None
                    await self._apply(stable.rebuild, attempt=0)
        finally:
            self._healthy = False
            if _unparsed_listeners.get(full_topic) == self._on_unparsed:
                del _unparsed_listeners[full_topic]
            await self._close_client()

    async def _stream_once(self) -> None:
        """Connect and join as needed, then watch; raises _Rebuild (or _Stable) when it goes down."""
        if self._client is None:
            await self._open_client()
        if self._channel is None:
            await self._join()
        try:
            await self._watch()
        except _Rebuild as rebuild:
            self._mark_down(rebuild.reason, failure=True)
            stable = self._up_since is not None and time.monotonic() - self._up_since >= self._t.stable_after
            if stable:
                raise _Stable(rebuild) from rebuild
            raise

    async def _rebuild(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, _Rebuild):
            self._up_since = None
            self._mark_down(error.reason, failure=True)
            await self._apply(error, attempt=state.attempt_number)

    async def _apply(self, rebuild: _Rebuild, attempt: int) -> None:
        self._rebuilds += 1
        self._log.bind(scope=rebuild.scope, attempt=attempt).debug("rebuilding: {}", rebuild.reason)
        if rebuild.scope == "client":
            await self._close_client()
        else:
            await self._drop_channel()

    async def _open_client(self) -> None:
        client = self._make_client()
        self._client = client
        self._gen += 1
        probe = AsyncRealtimeChannel(client, PHOENIX_CHANNEL)
        # Replies to heartbeats come on the `phoenix` topic; the client routes them to this channel,
        # whose push/ack machinery then times our heartbeats.
        client.channels[PHOENIX_CHANNEL] = probe
        self._probe = probe
        self._forget_heartbeat()
        try:
            async with asyncio.timeout(self._t.join_timeout):
                await client.connect()
        except TimeoutError as exc:
            raise _Rebuild("client", "connect timed out") from exc
        except Exception as exc:
            raise _Rebuild("client", f"connect failed: {type(exc).__name__}: {exc}") from exc

    async def _join(self) -> None:
        client = self._client
        assert client is not None
        self._gen += 1
        gen = self._gen
        self._subscribed = self._postgres_ready = False
        channel = client.channel(self._topic)
        if channel.is_joined or channel.is_joining:
            raise _Rebuild("client", "a previous channel of this topic is still attached")
        for binding in self._bindings:
            self._bind(channel, binding, self._on_change)
        channel.on_system(lambda payload: self._on_system(gen, payload))
        self._channel = channel
        try:
            async with asyncio.timeout(self._t.join_timeout):
                await channel.subscribe(lambda status, err: self._on_status(gen, status, err))
        except TimeoutError as exc:
            raise _Rebuild("client", "join timed out") from exc
        except Exception as exc:
            raise _Rebuild("client", f"join failed: {type(exc).__name__}: {exc}") from exc
        if not self._subscribed:
            why = f": {self._last_error}" if self._last_error else ""
            raise _Rebuild("channel", f"join refused ({channel.state.value}){why}")

    @staticmethod
    def _bind(channel: AsyncRealtimeChannel, binding: Binding, callback: Callable[[Any], None]) -> None:
        channel.on_postgres_changes(
            _EVENTS[binding.event],
            callback,
            table=binding.table,
            schema=binding.schema,
            filter=binding.filter,
        )

    async def _watch(self) -> None:
        """Return never; raise _Rebuild when the stream is down past its grace period."""
        client, channel = self._client, self._channel
        assert client is not None and channel is not None
        watch = _Watch()
        while True:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns instead of raising when
            # a cancel lands in the same step as the wake-up (a run ending at shutdown calls
            # follow()), and the cancelled watchdog would then rebuild forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._t.check_interval):
                    await self._wake.wait()
            self._wake.clear()
            now = time.monotonic()
            if self._probe_failed:
                raise _Rebuild("client", f"no heartbeat reply within {self._t.heartbeat_timeout:g}s")
            if not self._socket_up(client, watch, now):
                continue
            if channel.is_closed or channel.is_leaving:
                raise _Rebuild("channel", "channel closed by the server")
            if self._flowing(channel, watch, now):
                self._check_echo(now)
                self._heartbeat(now)
                self._sync_feeds(client, now)

    def _socket_up(self, client: AsyncRealtimeClient, watch: _Watch, now: float) -> bool:
        """Whether the socket is connected; raises once the client's own reconnects took too long."""
        if client.is_connected:
            watch.disconnected_at = None
            return True
        self._mark_down("socket disconnected")
        self._forget_heartbeat()
        watch.disconnected_at = watch.disconnected_at or now
        if now - watch.disconnected_at >= self._t.reconnect_grace:
            raise _Rebuild("client", f"socket still down after {self._t.reconnect_grace:g}s")
        return False

    def _flowing(self, channel: AsyncRealtimeChannel, watch: _Watch, now: float) -> bool:
        """Whether the channel is joined and changes flow; raises when it stayed otherwise too long."""
        joined = channel.is_joined and self._subscribed
        watch.unjoined_at = None if joined else watch.unjoined_at or now
        ready = joined and self._postgres_ready
        watch.unready_at = None if ready else watch.unready_at or now  # across the client's rejoins
        why = f" (last error: {self._last_error})" if self._last_error else ""
        if watch.unjoined_at is not None and now - watch.unjoined_at >= self._t.rejoin_grace:
            raise _Rebuild("channel", f"channel not joined after {self._t.rejoin_grace:g}s{why}")
        if watch.unready_at is not None and now - watch.unready_at >= self._t.postgres_timeout:
            # The client rejoins by itself, but a join the server answers and then refuses
            # (an error instead of "Subscribed to PostgreSQL") would cycle forever.
            raise _Rebuild("channel", f"no changes flowing after {self._t.postgres_timeout:g}s{why}")
        if not joined:
            self._mark_down(f"channel {channel.state.value}")
        elif not ready:
            self._mark_down("waiting for Subscribed to PostgreSQL")
        return ready

    def _sync_feeds(self, client: AsyncRealtimeClient, now: float) -> None:
        """Leave the feeds of runs no longer held, (re)join those of held runs that have none."""
        for run_id, feed in list(self._feeds.items()):
            stuck = not feed.ready and now - feed.since >= self._t.postgres_timeout
            if run_id not in self._followed or stuck:
                if stuck:
                    after = self._t.postgres_timeout
                    self._problem(f"no changes flowing on the feed of a held run after {after:g}s")
                self._leave_feed(client, feed)
            elif feed.channel.is_closed:
                feed.failed_at = feed.failed_at or now
                if now - feed.failed_at >= self._t.feed_retry:
                    self._leave_feed(client, feed)
        for run_id in sorted(self._followed - set(self._feeds)):
            self._join_feed(client, run_id, now)

    def _join_feed(self, client: AsyncRealtimeClient, run_id: str, now: float) -> None:
        self._feed_seq += 1
        # A topic of its own per join: a feed being left never shares its topic with its successor.
        channel = client.channel(f"{self._topic}:run:{run_id}:{self._feed_seq}")
        feed = _Feed(run_id, channel, since=now)
        self._feeds[run_id] = feed
        for binding in run_bindings(run_id, self._bindings[0].table):
            self._bind(channel, binding, lambda payload: self._on_feed_change(feed, payload))
        channel.on_system(lambda payload: self._on_feed_system(feed, payload))
        self._spawn(channel.subscribe(lambda status, err: self._on_feed_status(feed, status, err)))

    def _leave_feed(self, client: AsyncRealtimeClient, feed: _Feed) -> None:
        if self._feeds.get(feed.run_id) is feed:
            del self._feeds[feed.run_id]
        self._spawn(self._remove(client, feed.channel))

    async def _remove(self, client: AsyncRealtimeClient, channel: AsyncRealtimeChannel) -> None:
        async with asyncio.timeout(self._t.close_timeout):
            await client.remove_channel(channel)

    def _drop_feeds(self) -> None:
        """Leave every feed; the next healthy check joins them again, each with its CHECK."""
        if self._client is not None:
            for feed in list(self._feeds.values()):
                self._leave_feed(self._client, feed)
        self._feeds = {}

    def _check_echo(self, now: float) -> None:
        """Raise when none of this agent's own writes came back in time: the stream is silently dead."""
        within = self._echo_within
        if within is None:
            return
        if now - max(self._ready_at, self._echo_at) >= within:
            cause = (
                f"none of this agent's own writes came back through Realtime within {within:g}s: "
                "the server dropped its subscriptions, or the project is over its event quota"
            )
            self._problem(cause)
            raise _Rebuild("channel", cause)

    def _heartbeat(self, now: float) -> None:
        """Send one of our own heartbeats when due; its reply or timeout lands in the callbacks."""
        probe = self._probe
        if probe is None or not self._probe_replied:
            return
        if self._probe_sent_at is not None and now - self._probe_sent_at < self._t.heartbeat_interval:
            return
        epoch = self._probe_epoch
        push = AsyncPush(probe, ChannelEvents.heartbeat, {}, timeout=self._t.heartbeat_timeout)  # type: ignore[arg-type]
        push.receive(RealtimeAcknowledgementStatus.Ok, lambda _: self._on_heartbeat(epoch, True))
        push.receive(RealtimeAcknowledgementStatus.Error, lambda _: self._on_heartbeat(epoch, True))
        push.receive(RealtimeAcknowledgementStatus.Timeout, lambda: self._on_heartbeat(epoch, False))
        self._probe_sent_at, self._probe_replied = now, False
        # In a task: a send on a dead socket makes the client reconnect inside the sending task.
        self._spawn(push.send())

    def _forget_heartbeat(self) -> None:
        """A heartbeat sent on a socket that dropped says nothing about the next one."""
        self._probe_epoch += 1
        self._probe_sent_at, self._probe_replied, self._probe_failed = None, True, False

    def _on_heartbeat(self, epoch: int, replied: bool) -> None:
        try:
            if epoch != self._probe_epoch:
                return
            self._probe_replied = True
            if not replied:
                self._probe_failed = True
                self._wake.set()
        except Exception:  # pragma: no cover - never let a callback unwind the client
            self._log.exception("heartbeat callback failed")

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._log.debug("realtime send failed: {}", task.exception())

    # Callbacks: called by the client inside its listen task; they never raise.

    def _on_change(self, payload: Any) -> None:
        try:
            # realtime-py calls each matching binding's callback with the same payload: one hint.
            if payload is self._last_payload:
                return
            self._last_payload = payload
            data = change_data(payload)
            if data is None:
                self._log.warning("ignoring a malformed postgres_changes payload")
                return
            for error in change_errors(data):
                self._problem(f"{data.get('schema')}.{data.get('table')}: {error}")
            if self._is_echo(data):
                self._echoes += 1
                self._echo_at = time.monotonic()
            if data.get("table") != self._bindings[0].table or is_progress_write(payload):
                return
            hint = hint_from_change(payload)
            if hint is None:
                self._log.warning("ignoring a malformed postgres_changes payload")
                return
            self._sink(hint)
        except Exception:
            self._log.exception("hint delivery failed")

    def _on_feed_change(self, feed: _Feed, payload: Any) -> None:
        try:
            if self._feeds.get(feed.run_id) is not feed:
                return
            data = change_data(payload)
            for error in change_errors(data or {}):
                self._problem(f"feed of a held run: {error}")
            hint = hint_from_change(payload)
            if hint is None:
                self._log.bind(run_id=feed.run_id).warning("ignoring a malformed postgres_changes payload")
            elif not is_own_write(hint, self._worker_id):
                self._sink(hint)
        except Exception:
            self._log.exception("hint delivery failed")

    def _on_feed_system(self, feed: _Feed, payload: Any) -> None:
        try:
            if self._feeds.get(feed.run_id) is not feed:
                return
            message = str(getattr(payload, "message", ""))
            if getattr(payload, "extension", "") == "postgres_changes" and SUBSCRIBED_TO_POSTGRES in message:
                feed.ready, feed.failed_at = True, None
                self._sink(Hint(feed.run_id, "CHECK", claimable=False))
            elif getattr(payload, "status", "") == "error":
                self._problem(f"feed of a held run: {message}")
        except Exception:
            self._log.exception("feed system message callback failed")

    def _on_feed_status(self, feed: _Feed, status: RealtimeSubscribeStates, error: Exception | None) -> None:
        try:
            if self._feeds.get(feed.run_id) is not feed or status == RealtimeSubscribeStates.SUBSCRIBED:
                return
            feed.ready, feed.since = False, time.monotonic()
            if error is not None:
                self._problem(f"feed of a held run {status.value}: {_server_words(error)}")
            self._wake.set()
        except Exception:
            self._log.exception("feed status callback failed")

    def _is_echo(self, data: dict[str, Any]) -> bool:
        record = data.get("record") or data.get("old_record")
        return (
            self._worker_id is not None
            and isinstance(record, dict)
            and record.get("worker_id") == self._worker_id
        )

    def _on_unparsed(self, frame: dict[str, Any]) -> None:
        """A frame realtime-py dropped: an `Error 401`/`Error 400` change, say. Never raises."""
        try:
            data = change_data(frame.get("payload"))
            if frame.get("event") == "postgres_changes" and data is not None:
                for error in change_errors(data) or ("a change realtime-py could not parse",):
                    self._problem(f"{data.get('schema')}.{data.get('table')}: {error}")
        except Exception:
            self._log.exception("unparsed frame callback failed")

    def _on_system(self, gen: int, payload: Any) -> None:
        try:
            if gen != self._gen:
                return
            message = str(getattr(payload, "message", ""))
            if getattr(payload, "extension", "") == "postgres_changes" and SUBSCRIBED_TO_POSTGRES in message:
                self._postgres_ready = True
                self._subscriptions += 1
                self._ready_at = time.monotonic()
                self._mark_up()
                self._catch_up()
                self._wake.set()
        except Exception:
            self._log.exception("system message callback failed")

    def _on_status(self, gen: int, status: RealtimeSubscribeStates, error: Exception | None) -> None:
        try:
            if gen != self._gen:
                return
            if status == RealtimeSubscribeStates.SUBSCRIBED:
                self._subscribed = True
                self._postgres_ready = False
            else:
                self._subscribed = False
                self._postgres_ready = False
                if error is not None:
                    self._last_error = _server_words(error)
                    self._problem(f"channel {status.value}: {self._last_error}")
                # A refusal by the server (the table not in the publication, say) deserves its one
                # warning even before the stream was ever up.
                reason = f"channel {status.value}" + (f": {error}" if error else "")
                self._mark_down(reason, failure=error is not None)
            self._wake.set()
        except Exception:
            self._log.exception("subscribe status callback failed")

    def _catch_up(self) -> None:
        try:
            self._on_subscribed()
        except Exception:
            self._log.exception("on_subscribed callback failed")

    def _mark_up(self) -> None:
        if self._healthy:
            return
        self._healthy = True
        now = time.monotonic()
        self._up_since = now
        log = self._log.bind(subscriptions=self._subscriptions)
        if self._down_since is not None and self._ever_up:
            log.bind(outage_s=round(now - self._down_since, 3)).info("realtime resubscribed")
        else:
            log.bind(startup_s=round(now - (self._down_since or now), 3)).info("realtime subscribed")
        self._ever_up = True
        self._down_since = None
        self._outage_logged = False

    def _mark_down(self, reason: str, *, failure: bool = False) -> None:
        """Unhealthy from now; the first failure of an outage is logged, later ones only at DEBUG."""
        self._healthy = False
        if self._down_since is None:
            self._down_since = time.monotonic()
        if not self._outage_logged and (failure or self._ever_up):
            self._outage_logged = True
            self._log.bind(reason=reason).warning("realtime down: polling until it is back")

    async def _drop_channel(self) -> None:
        self._drop_feeds()
        channel, client = self._channel, self._client
        self._channel = None
        self._gen += 1
        self._subscribed = self._postgres_ready = False
        if channel is None or client is None:
            return
        try:
            async with asyncio.timeout(self._t.close_timeout):
                await client.remove_channel(channel)
        except Exception as exc:
            self._log.debug("leaving the old channel failed: {}", exc)
        if client.channels.get(channel.topic) is channel:
            # remove_channel did not get that far (the leave push hung): the next join needs the topic.
            await self._close_client()

    async def _close_client(self) -> None:
        client = self._client
        self._client, self._channel, self._probe = None, None, None
        self._feeds = {}  # their channels close with the client
        self._gen += 1
        self._forget_heartbeat()
        self._subscribed = self._postgres_ready = False
        for task in list(self._tasks):
            task.cancel()
        if client is None:
            return
        tasks = [getattr(client, name, None) for name in ("_listen_task", "_heartbeat_task")]
        try:
            async with asyncio.timeout(self._t.close_timeout):
                await client.close()
        except Exception as exc:
            self._log.debug("closing the realtime client failed: {}", exc)
        for own in tasks:
            # A client that gave up raised from its own listen task, which nobody awaits: collect
            # that exception here rather than have asyncio report it as never retrieved.
            if isinstance(own, asyncio.Task) and own.done() and not own.cancelled() and own.exception():
                self._log.debug("the realtime client had stopped: {}", own.exception())
