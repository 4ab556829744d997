"""RunStore and RunAdmin over psycopg 3 async, one named .sql file per query."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, Self, assert_never

import psycopg
from loguru import logger
from psycopg.pq import TransactionStatus
from psycopg.rows import DictRow, dict_row
from psycopg.types.json import Jsonb, set_json_loads

from agent.backends.postgres.sqlfiles import query
from agent.domain.errors import BackendError, BackendUnavailable
from agent.domain.run import (
    CANCELED_MESSAGE,
    Canceled,
    Claimed,
    Completed,
    Failed,
    Lease,
    NewRun,
    Outcome,
    PollResult,
    Pulse,
    RescueReport,
    RunRow,
    WorkerInfo,
    WorkerState,
    hardware_columns,
    json_safe,
    new_run_columns,
)
from agent.domain.status import RunStatus
from agent.domain.untrusted import load_json

Conn = psycopg.AsyncConnection[DictRow]

# Rows with a status the agent does not know (written by a newer app, or by hand) are never
# claimable, since the SQL predicates list the statuses; `get` returns None for them and
# `list_runs` skips them, each with a warning, so that one odd row cannot stop the agent.


def _jsonb(value: Any) -> Jsonb:
    return Jsonb(json_safe(value))


def _uuid(run_id: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(run_id))
    except ValueError:
        return None


def _row(record: Mapping[str, Any]) -> RunRow | None:
    try:
        status = RunStatus(record["status"])
    except ValueError:
        logger.bind(run_id=str(record["id"]), status=record["status"]).warning(
            "skipping a run with an unknown status"
        )
        return None
    results = record["results"]
    return RunRow(
        id=str(record["id"]),
        status=status,
        data_yaml=record["data_yaml"],
        base_model=record["base_model"],
        configuration=record["configuration"],
        cancel_requested=bool(record["cancel_requested"]),
        worker_id=record["worker_id"],
        attempt=int(record["attempt"] or 0),
        created_at=record["created_at"],
        started_at=record["started_at"],
        heartbeat_at=record["heartbeat_at"],
        completed_at=record["completed_at"],
        canceled_at=record["canceled_at"],
        error_message=record["error_message"],
        trained_model_url=record["trained_model_url"],
        results=results if isinstance(results, dict) else None,
    )


def _fence(lease: Lease) -> dict[str, Any]:
    return {"id": _uuid(lease.run_id), "worker_id": lease.worker_id, "attempt": lease.attempt}


class _Connections:
    """A handful of autocommit connections, opened on demand, each lent to one query at a time."""

    # No retries in here, the core owns the retry policy: a call on a lost connection raises
    # BackendUnavailable and the next call opens a fresh one. A broken connection takes the idle
    # ones with it, since a server restart or a network cut usually kills them all.

    def __init__(self, conninfo: str, size: int, connect_timeout: float, application_name: str) -> None:
        self._conninfo = conninfo
        self._connect_timeout = connect_timeout
        self._application_name = application_name
        self._slots = asyncio.Semaphore(size)
        self._idle: list[Conn] = []
        self._closed = False

    async def _open(self) -> Conn:
        conn = await psycopg.AsyncConnection.connect(
            self._conninfo,
            autocommit=True,
            row_factory=dict_row,
            connect_timeout=max(1, math.ceil(self._connect_timeout)),
            application_name=self._application_name,
        )
        # json/jsonb columns are the row's, so untrusted: decoded within limits, never raising (a
        # too deep or too big configuration comes back as Unreadable and fails only its run).
        set_json_loads(load_json, conn)
        return conn

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Conn]:
        if self._closed:
            raise BackendError("the store is closed")
        async with self._slots:
            conn = self._idle.pop() if self._idle else await self._open()
            try:
                yield conn
            finally:
                # Anything but an idle, healthy connection (a broken one, or one whose query was
                # cancelled midway) is not reused.
                idle = conn.info.transaction_status == TransactionStatus.IDLE
                if idle and not self._closed and not conn.closed:
                    self._idle.append(conn)
                else:
                    if conn.broken:
                        await self._drop_idle()
                    await conn.close()

    async def _drop_idle(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.close()

    async def close(self) -> None:
        self._closed = True
        await self._drop_idle()


class PostgresStore:
    """`training_runs` and `trainer_workers` in any Postgres that has the schema applied."""

    def __init__(
        self,
        conninfo: str,
        *,
        max_connections: int = 4,
        connect_timeout: float = 10.0,
        query_timeout: float = 30.0,
        application_name: str = "saturnos-agent",
    ) -> None:
        self._pool = _Connections(conninfo, max_connections, connect_timeout, application_name)
        self._query_timeout = query_timeout

    @classmethod
    async def connect(
        cls,
        conninfo: str,
        *,
        max_connections: int = 4,
        connect_timeout: float = 10.0,
        query_timeout: float = 30.0,
        application_name: str = "saturnos-agent",
    ) -> Self:
        """Open the store and check that the database answers and has the schema."""
        store = cls(
            conninfo,
            max_connections=max_connections,
            connect_timeout=connect_timeout,
            query_timeout=query_timeout,
            application_name=application_name,
        )
        try:
            probe = await store._one("probe", {})
        except BaseException:
            await store.close()
            raise
        if probe is None or not probe["ready"]:
            await store.close()
            raise BackendError("the database has no training_runs schema: run `saturnos-agent migrate`")
        return store

    async def close(self) -> None:
        await self._pool.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @asynccontextmanager
    async def _cursor(self) -> AsyncIterator[psycopg.AsyncCursor[DictRow]]:
        try:
            async with (
                asyncio.timeout(self._query_timeout),
                self._pool.connection() as conn,
                conn.cursor() as cur,
            ):
                yield cur
        except TimeoutError as exc:
            raise BackendUnavailable(f"database query timed out after {self._query_timeout:g}s") from exc
        except (psycopg.OperationalError, psycopg.InterfaceError, OSError) as exc:
            raise BackendUnavailable(f"database unavailable: {exc}") from exc
        except psycopg.Error as exc:
            raise BackendError(f"database error: {exc}") from exc

    async def _one(self, name: str, params: Mapping[str, Any]) -> DictRow | None:
        async with self._cursor() as cur:
            await cur.execute(query(name), params)
            return await cur.fetchone()

    async def _execute(self, name: str, params: Mapping[str, Any]) -> None:
        async with self._cursor() as cur:
            await cur.execute(query(name), params)

    async def _all(self, name: str, params: Mapping[str, Any]) -> list[DictRow]:
        async with self._cursor() as cur:
            await cur.execute(query(name), params)
            return await cur.fetchall()

    async def poll(self, limit: int) -> PollResult:
        rows = await self._all("poll", {"limit": limit})
        return PollResult(
            claimable=tuple(str(r["id"]) for r in rows if r["kind"] == "claimable"),
            cancel_unclaimed=tuple(str(r["id"]) for r in rows if r["kind"] == "cancel"),
        )

    async def claim(self, run_id: str, worker_id: str) -> Claimed | None:
        rid = _uuid(run_id)
        if rid is None:
            return None
        record = await self._one("claim", {"id": rid, "worker_id": worker_id})
        if record is None:
            return None
        row = _row(record)
        if row is None:  # cannot happen: claim.sql sets a known status
            raise BackendError(f"claimed run {run_id} came back with status {record['status']!r}")
        return Claimed(Lease(row.id, worker_id, row.attempt), row)

    async def get(self, run_id: str) -> RunRow | None:
        rid = _uuid(run_id)
        if rid is None:
            return None
        record = await self._one("run_get", {"id": rid})
        return None if record is None else _row(record)

    async def touch(self, lease: Lease, results: Mapping[str, Any] | None = None) -> Pulse | None:
        if _uuid(lease.run_id) is None:
            return None
        record = await self._one("touch", {**_fence(lease), "patch": _jsonb(results or {})})
        return None if record is None else Pulse(cancel_requested=bool(record["cancel_requested"]))

    async def mark_canceling(self, lease: Lease) -> bool:
        if _uuid(lease.run_id) is None:
            return False
        return await self._one("mark_canceling", _fence(lease)) is not None

    async def finish(self, lease: Lease, outcome: Outcome) -> bool:
        if _uuid(lease.run_id) is None:
            return False
        fence = _fence(lease)
        if isinstance(outcome, Completed):
            record = await self._one(
                "finish_completed",
                {**fence, "results": _jsonb(outcome.results), "trained_model_url": outcome.trained_model_url},
            )
        elif isinstance(outcome, Failed):
            record = await self._one(
                "finish_failed",
                {**fence, "results": _jsonb(outcome.results), "error_message": outcome.error_message},
            )
        elif isinstance(outcome, Canceled):
            record = await self._one("finish_canceled", {**fence, "error_message": outcome.error_message})
        else:
            assert_never(outcome)
        return record is not None and bool(record["landed"])

    async def release(self, lease: Lease) -> bool:
        if _uuid(lease.run_id) is None:
            return False
        return await self._one("release", _fence(lease)) is not None

    async def cancel_unclaimed(self, run_id: str) -> bool:
        rid = _uuid(run_id)
        if rid is None:
            return False
        record = await self._one("cancel_unclaimed", {"id": rid, "error_message": CANCELED_MESSAGE})
        return record is not None

    async def rescue_stale(self, stale_after_s: float, max_attempts: int) -> RescueReport:
        """Requeue stale runs, or end them (reported in `failed`, canceled ones included)."""
        params = {"stale_after": float(stale_after_s), "max_attempts": max_attempts}
        canceled = await self._all("rescue_cancel", {**params, "error_message": CANCELED_MESSAGE})
        failed = await self._all("rescue_fail", params)
        requeued = await self._all("rescue_requeue", params)
        offline = await self._all("rescue_workers", {"stale_after": float(stale_after_s)})
        report = RescueReport(
            requeued=tuple(str(r["id"]) for r in requeued),
            failed=tuple(str(r["id"]) for r in (*failed, *canceled)),
            offline_workers=tuple(str(r["worker_id"]) for r in offline),
        )
        for worker_id in report.offline_workers:
            logger.bind(worker=worker_id).warning("stale worker marked offline")
        for run_id in report.requeued:
            logger.bind(run_id=run_id).warning("stale run put back to claimable")
        for run_id in report.failed:
            logger.bind(run_id=run_id).warning("stale run ended")
        return report

    async def register_worker(self, worker: WorkerInfo, state: WorkerState) -> None:
        await self._execute(
            "register_worker",
            {
                "worker_id": worker.worker_id,
                "status": state.status.value,
                "host": worker.host,
                "gpus": Jsonb(list(worker.gpus)),
                "version": worker.version,
                "slots": worker.slots,
                "current_run": state.current_runs[0] if state.current_runs else None,
                "current_runs": Jsonb(list(state.current_runs)),
                **hardware_columns(worker),
                "free_slots": state.free_slots,
            },
        )

    async def largest_worker(self) -> int:
        record = await self._one("largest_worker", {})
        return int(record["largest"]) if record is not None else 0

    async def submit(self, run: NewRun) -> str:
        record = await self._one(
            "run_submit",
            {
                "data_yaml": run.data_yaml,
                "base_model": run.base_model,
                "configuration": _jsonb(run.configuration),
                **new_run_columns(run),
            },
        )
        if record is None:
            raise BackendError("insert into training_runs returned no id")
        return str(record["id"])

    async def request_cancel(self, run_id: str) -> bool:
        rid = _uuid(run_id)
        if rid is None:
            return False
        return await self._one("run_request_cancel", {"id": rid}) is not None

    async def list_runs(self, limit: int = 20) -> list[RunRow]:
        records = await self._all("runs_list", {"limit": limit})
        return [row for row in map(_row, records) if row is not None]
