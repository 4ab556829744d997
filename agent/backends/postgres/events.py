"""RunEvents over LISTEN/NOTIFY: a dedicated, health-checked connection that reconnects itself."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from contextlib import aclosing
from typing import Any

import psycopg
from loguru import logger
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential_jitter

from agent.backends.postgres.sqlfiles import query
from agent.domain.run import Hint, HintOp
from agent.domain.status import RunStatus
from agent.ports import HintSink

CHANNEL = "saturnos_training_runs"  # as in schema.sql and listen.sql
_OPS: dict[str, HintOp] = {"INSERT": "INSERT", "UPDATE": "UPDATE", "DELETE": "DELETE"}
_LOST = (psycopg.Error, OSError, TimeoutError)


def parse_notify(payload: str) -> Hint | None:
    """The trigger's JSON payload as a Hint; None for anything malformed."""
    try:
        data = json.loads(payload)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not data.get("id") or data.get("op") not in _OPS:
        return None
    try:
        status: RunStatus | None = RunStatus(str(data.get("status")))
    except ValueError:
        status = None
    worker = data.get("worker_id")
    raw_status, attempt = data.get("status"), data.get("attempt")
    return Hint(
        run_id=str(data["id"]),
        op=_OPS[data["op"]],
        claimable=data.get("claimable") is True,
        cancel_requested=data.get("cancel_requested") is True,
        worker_id=str(worker) if worker is not None else None,
        status=status,
        raw_status=str(raw_status)[:64] if raw_status is not None else None,
        attempt=attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else None,
    )


class PostgresEvents:
    """Hints from the schema's NOTIFY trigger on channel `saturnos_training_runs`."""

    def __init__(
        self,
        conninfo: str,
        *,
        health_interval: float = 5.0,
        health_timeout: float = 5.0,
        connect_timeout: float = 10.0,
        initial_backoff: float = 0.2,
        max_backoff: float = 30.0,
        application_name: str = "saturnos-agent listen",
    ) -> None:
        self._conninfo = conninfo
        self._health_interval = health_interval
        self._health_timeout = health_timeout
        self._connect_timeout = connect_timeout
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._application_name = application_name
        self._healthy = False
        self._subscriptions = 0

    @property
    def healthy(self) -> bool:
        return self._healthy

    def follow(self, run_ids: frozenset[str]) -> None:
        """Nothing to do: the trigger notifies every change of every run, a takeover included."""

    async def listen(self, sink: HintSink, on_subscribed: Callable[[], None]) -> None:
        """Stream hints until cancelled; each (re)LISTEN is followed by `on_subscribed()`."""
        short_lived = 0
        try:
            while True:
                conn = await self._connect()
                started = time.monotonic()
                try:
                    await self._serve(conn, sink, on_subscribed)
                except _LOST as exc:
                    self._healthy = False
                    logger.bind(channel=CHANNEL, subscriptions=self._subscriptions, error=str(exc)).warning(
                        "listen connection lost"
                    )
                finally:
                    self._healthy = False
                    await conn.close()
                # A connection that dies right after it was made (a server refusing work, a proxy
                # cutting idle sessions) must not turn into a tight reconnect loop.
                short_lived = short_lived + 1 if time.monotonic() - started < self._health_interval else 0
                if short_lived:
                    await asyncio.sleep(self._backoff(short_lived))
        finally:
            self._healthy = False

    def _backoff(self, failures: int) -> float:
        return float(min(self._max_backoff, self._initial_backoff * 2 ** (failures - 1)))

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(_LOST),
            wait=wait_exponential_jitter(initial=self._initial_backoff, max=self._max_backoff),
            before_sleep=self._log_reconnect,
            reraise=True,
        ):
            with attempt:
                conn = await psycopg.AsyncConnection.connect(
                    self._conninfo,
                    autocommit=True,
                    connect_timeout=max(1, round(self._connect_timeout)),
                    application_name=self._application_name,
                )
                try:
                    async with asyncio.timeout(self._health_timeout):
                        await conn.execute(query("listen"))
                except BaseException:
                    await conn.close()
                    raise
                return conn
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _log_reconnect(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        logger.bind(channel=CHANNEL, attempt=state.attempt_number, error=str(exc)).warning(
            "listen reconnect failed"
        )

    async def _serve(
        self, conn: psycopg.AsyncConnection[Any], sink: HintSink, on_subscribed: Callable[[], None]
    ) -> None:
        self._healthy = True
        self._subscriptions += 1
        pid = conn.info.backend_pid
        logger.bind(channel=CHANNEL, subscriptions=self._subscriptions, backend_pid=pid).info("listening")
        try:
            on_subscribed()
        except Exception:
            logger.bind(channel=CHANNEL).exception("on_subscribed callback failed")
        while True:
            async with aclosing(conn.notifies(timeout=self._health_interval)) as notifies:
                async for notify in notifies:
                    self._deliver(notify.payload, sink)
            # Quiet for a while: make sure the connection is still there (a silent network cut
            # never raises on its own). Notifies that arrive meanwhile are kept by psycopg.
            async with asyncio.timeout(self._health_timeout):
                await conn.execute(query("ping"))

    @staticmethod
    def _deliver(payload: str, sink: HintSink) -> None:
        hint = parse_notify(payload)
        if hint is None:
            logger.bind(channel=CHANNEL, payload=payload[:200]).warning("ignoring a malformed notification")
            return
        try:
            sink(hint)
        except Exception:
            logger.bind(channel=CHANNEL, run_id=hint.run_id).exception("hint sink failed")
