"""RunStore and RunAdmin over PostgREST, through the supabase async client's `.table()`.

Every write is one PATCH (or POST) whose filters carry the whole condition, so PostgREST runs it
as one UPDATE and Postgres re-checks the condition on the row's latest version: the claim (the
claimable predicate) and every fenced write (`worker_id`, `attempt`, a live status). `attempt` is
incremented by the schema's BEFORE UPDATE trigger when `worker_id` goes from null to a value, so a
plain PATCH fences like the postgres backend's SQL, with no database function.

Clock: PostgREST cannot write the server's now() in a PATCH, so timestamps (started_at,
heartbeat_at, completed_at, …) come from this host's UTC clock. Hosts should run NTP. Rescue
compares other hosts' heartbeats with this host's clock, so it allows `clock_skew_margin` seconds on
top of STALE_AFTER before it judges a run stale.

`results` merges (touch, completed, failed) read the row and write the merged object back under
the same fence: PostgREST has no jsonb `||`, and only the run's owner writes `results`.

No retries in here: the client's own retry is disabled and the core owns the retry policy.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, assert_never

from loguru import logger
from postgrest import APIError, AsyncQueryRequestBuilder, AsyncRequestBuilder, AsyncSelectRequestBuilder
from postgrest.types import ReturnMethod
from supabase import AsyncClient

from agent.backends.supabase.rows import json_column, parse_row
from agent.backends.supabase.transport import boundary, utc_now
from agent.domain.errors import BackendError, MissingPrivilege
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
from agent.domain.status import CLAIMABLE_STATUSES, RunStatus, WorkerStatus

RUNS = "training_runs"
WORKERS = "trainer_workers"
# The row's JSON columns come as text and are decoded here within limits (agent.domain.untrusted):
# decoded by the HTTP client, a configuration nested a few thousand levels deep would raise a
# RecursionError out of the claim itself, after the claim committed.
ROW_COLUMNS = (
    "id,status,data_yaml,base_model,configuration::text,cancel_requested,worker_id,attempt,created_at,"
    "started_at,heartbeat_at,completed_at,canceled_at,error_message,trained_model_url,results::text"
)
_CLAIMABLE = sorted(s.value for s in CLAIMABLE_STATUSES)
_LIVE = [RunStatus.RUNNING.value, RunStatus.CANCELING.value]  # statuses an owner may still write
_TERMINAL = [RunStatus.COMPLETED.value, RunStatus.FAILED.value, RunStatus.CANCELED.value]
# `cancel_requested is not true`: PostgREST's `not.is.true` is `is not true`, but older servers
# reject it, so spell it out.
_NOT_CANCELED = "cancel_requested.is.null,cancel_requested.eq.false"

Query = AsyncSelectRequestBuilder
# What each PostgREST method needs of the table (a PATCH or POST that returns rows also reads them).
_PRIVILEGES: dict[str, tuple[str, ...]] = {
    "GET": ("SELECT",),
    "HEAD": ("SELECT",),
    "PATCH": ("SELECT", "UPDATE"),
    "POST": ("SELECT", "INSERT", "UPDATE"),
    "DELETE": ("SELECT", "DELETE"),
}
_DENIED_TABLE = re.compile(r"permission denied for (?:table|relation) (\S+)")
_DENIED_SCHEMA = re.compile(r"permission denied for schema (\S+)")


def key_role(key: str) -> str:
    """The role an API key acts as: its JWT's `role` claim (read, unverified); other keys: service_role."""
    parts = key.split(".")
    if len(parts) == 3:
        try:
            padded = parts[1] + "=" * (-len(parts[1]) % 4)
            role = json.loads(base64.urlsafe_b64decode(padded)).get("role")
        except (ValueError, AttributeError):
            role = None
        if isinstance(role, str) and role:
            return role
    return "service_role"


def missing_privilege(
    error: APIError, what: str, role: str, method: str, target: str | None = None
) -> MissingPrivilege:
    """A 42501 in words an operator can act on: which role lacks what on which table, and the fix."""
    message = str(error.message or "")
    schema = _DENIED_SCHEMA.search(message)
    if schema:
        name = schema.group(1)
        return MissingPrivilege(
            f"{what}: role {role} may not use schema {name}: run the saturnos-agent migration "
            f"(deploy/supabase/migrations) or `grant usage on schema {name} to {role}`",
            role=role,
            table=name,
            privileges=("USAGE",),
        )
    found = _DENIED_TABLE.search(message)
    table = found.group(1) if found else (target or "the table")
    privileges = _PRIVILEGES.get(method.upper(), ("SELECT",))
    qualified = table if "." in table or not found else f"public.{table}"
    if found and target is not None and table != target:
        # Not the table the request names: a trigger or a policy of it touched another table.
        return MissingPrivilege(
            f"{what}: role {role} was denied on {qualified}, which a trigger or a policy of "
            f"public.{target} uses: grant {role} what it does there, or make that trigger's "
            "function `security definer`",
            role=role,
            table=qualified,
            privileges=(),
        )
    return MissingPrivilege(
        f"{what}: the table {qualified} exists but role {role} has no {'/'.join(privileges)} on it: "
        f"run the saturnos-agent migration (deploy/supabase/migrations, or the SQL of "
        f"`saturnos-agent migrate --print`) or `grant {', '.join(p.lower() for p in privileges)} "
        f"on {qualified} to {role}`",
        role=role,
        table=qualified,
        privileges=privileges,
    )


def _uuid(run_id: str) -> str | None:
    try:
        return str(uuid.UUID(str(run_id)))
    except ValueError:
        return None


def _fenced(query: Query, lease: Lease) -> Query:
    return (
        query.eq("id", lease.run_id)
        .eq("worker_id", lease.worker_id)
        .eq("attempt", lease.attempt)
        .in_("status", _LIVE)
    )


def _merged(current: object, patch: Mapping[str, Any]) -> dict[str, Any]:
    """`results || patch` as the postgres backend computes it: a non-object is replaced."""
    base = dict(current) if isinstance(current, dict) else {}
    return {**base, **json_safe(patch)}


class SupabaseStore:
    """`training_runs` and `trainer_workers` through PostgREST."""

    def __init__(self, client: AsyncClient, *, clock_skew_margin: float = 15.0) -> None:
        self._client = client
        self._clock_skew_margin = clock_skew_margin
        self._role = key_role(str(client.supabase_key))

    def _runs(self) -> AsyncRequestBuilder:
        return self._client.table(RUNS)

    async def _rows(self, query: AsyncQueryRequestBuilder, what: str) -> list[dict[str, Any]]:
        try:
            with boundary(what):
                response = await query.execute()
        except BackendError as exc:
            cause = exc.__cause__
            if isinstance(cause, APIError) and cause.code == "42501":
                request = query.request
                target = str(request.path).rstrip("/").rsplit("/", 1)[-1] or None
                raise missing_privilege(cause, what, self._role, request.http_method, target) from cause
            raise
        data = response.data
        if not isinstance(data, list):
            raise BackendError(f"{what}: PostgREST answered {type(data).__name__}, not a list of rows")
        return [row for row in data if isinstance(row, dict)]

    async def probe(self) -> None:
        """Check that PostgREST answers and exposes both tables."""
        await self._rows(self._runs().select("id").limit(1), "schema probe")
        await self._rows(self._client.table(WORKERS).select("worker_id").limit(1), "schema probe")

    async def poll(self, limit: int) -> PollResult:
        claimable = await self._rows(
            self._runs()
            .select("id")
            .in_("status", _CLAIMABLE)
            .is_("started_at", None)
            .is_("worker_id", None)
            .or_(_NOT_CANCELED)
            .order("created_at")
            .order("id")
            .limit(limit),
            "poll claimable",
        )
        cancel = await self._rows(
            self._runs()
            .select("id")
            .in_("status", _CLAIMABLE)
            .is_("worker_id", None)
            .is_("cancel_requested", True)
            .order("created_at")
            .order("id")
            .limit(limit),
            "poll cancel requests",
        )
        return PollResult(
            claimable=tuple(str(r["id"]) for r in claimable),
            cancel_unclaimed=tuple(str(r["id"]) for r in cancel),
        )

    async def claim(self, run_id: str, worker_id: str) -> Claimed | None:
        """One conditional PATCH; a lost answer raises BackendUnavailable and the core reads the row."""
        rid = _uuid(run_id)
        if rid is None:
            return None
        now = utc_now()
        rows = await self._rows(
            self._runs()
            .update(
                {
                    "status": RunStatus.RUNNING.value,
                    "worker_id": worker_id,
                    "started_at": now,
                    "heartbeat_at": now,
                }
            )
            .eq("id", rid)
            .in_("status", _CLAIMABLE)
            .is_("started_at", None)
            .is_("worker_id", None)
            .or_(_NOT_CANCELED)
            .select(ROW_COLUMNS),
            "claim",
        )
        if not rows:
            return None
        row = parse_row(rows[0])
        if row is None:  # cannot happen: the PATCH sets a known status
            raise BackendError(f"claimed run {run_id} came back with status {rows[0].get('status')!r}")
        return Claimed(Lease(row.id, worker_id, row.attempt), row)

    async def get(self, run_id: str) -> RunRow | None:
        rid = _uuid(run_id)
        if rid is None:
            return None
        rows = await self._rows(self._runs().select(ROW_COLUMNS).eq("id", rid).limit(1), "get run")
        return parse_row(rows[0]) if rows else None

    async def _read_results(self, lease: Lease, what: str) -> tuple[bool, object]:
        rows = await self._rows(_fenced(self._runs().select("results::text"), lease).limit(1), what)
        return (True, json_column(rows[0].get("results"))) if rows else (False, None)

    async def touch(self, lease: Lease, results: Mapping[str, Any] | None = None) -> Pulse | None:
        if _uuid(lease.run_id) is None:
            return None
        body: dict[str, Any] = {"heartbeat_at": utc_now()}
        if results:
            owned, current = await self._read_results(lease, "progress read")
            if not owned:
                return None
            body["results"] = _merged(current, results)
        rows = await self._rows(
            _fenced(self._runs().update(body), lease).select("cancel_requested"), "progress write"
        )
        return Pulse(cancel_requested=bool(rows[0].get("cancel_requested"))) if rows else None

    async def mark_canceling(self, lease: Lease) -> bool:
        if _uuid(lease.run_id) is None:
            return False
        body = {"status": RunStatus.CANCELING.value, "heartbeat_at": utc_now()}
        return bool(
            await self._rows(_fenced(self._runs().update(body), lease).select("id"), "mark canceling")
        )

    async def finish(self, lease: Lease, outcome: Outcome) -> bool:
        """Fenced final write; a retry after a lost answer finds the row finished by this lease: True."""
        if _uuid(lease.run_id) is None:
            return False
        now = utc_now()
        body: dict[str, Any]
        if isinstance(outcome, Completed):
            target = RunStatus.COMPLETED
            body = {
                "status": target.value,
                "completed_at": now,
                "trained_model_url": outcome.trained_model_url,
            }
            merge: Mapping[str, Any] | None = outcome.results
        elif isinstance(outcome, Failed):
            target = RunStatus.FAILED
            body = {"status": target.value, "completed_at": now, "error_message": outcome.error_message}
            merge = outcome.results
        elif isinstance(outcome, Canceled):
            target = RunStatus.CANCELED
            body = {
                "status": target.value,
                "canceled_at": now,
                "completed_at": now,
                "error_message": outcome.error_message,
            }
            merge = None
        else:
            assert_never(outcome)
        if merge is not None:
            owned, current = await self._read_results(lease, "final read")
            if not owned:
                return await self._landed(lease, target)
            body["results"] = _merged(current, merge)
        rows = await self._rows(_fenced(self._runs().update(body), lease).select("id"), "final write")
        return bool(rows) or await self._landed(lease, target)

    async def _landed(self, lease: Lease, target: RunStatus) -> bool:
        """Whether this lease already wrote `target` (an earlier attempt whose answer was lost)."""
        rows = await self._rows(
            self._runs()
            .select("id")
            .eq("id", lease.run_id)
            .eq("worker_id", lease.worker_id)
            .eq("attempt", lease.attempt)
            .eq("status", target.value)
            .limit(1),
            "final write check",
        )
        return bool(rows)

    async def release(self, lease: Lease) -> bool:
        if _uuid(lease.run_id) is None:
            return False
        body = {"status": RunStatus.QUEUED.value, "worker_id": None, "started_at": None, "heartbeat_at": None}
        return bool(await self._rows(_fenced(self._runs().update(body), lease).select("id"), "release"))

    async def cancel_unclaimed(self, run_id: str) -> bool:
        rid = _uuid(run_id)
        if rid is None:
            return False
        now = utc_now()
        body = {
            "status": RunStatus.CANCELED.value,
            "canceled_at": now,
            "completed_at": now,
            "error_message": CANCELED_MESSAGE,
        }
        rows = await self._rows(
            self._runs()
            .update(body)
            .eq("id", rid)
            .in_("status", _CLAIMABLE)
            .is_("worker_id", None)
            .is_("cancel_requested", True)
            .select("id"),
            "cancel unclaimed",
        )
        return bool(rows)

    async def rescue_stale(self, stale_after_s: float, max_attempts: int) -> RescueReport:
        """Requeue or end runs whose owner stopped heartbeating, as the postgres backend does."""
        # Each PATCH carries the staleness condition, so a heartbeat that lands first wins. Stale
        # runs with a cancel request end `canceled` and are reported in `failed` with the runs that
        # used up their attempts. Rows with no heartbeat (claimed by the old script) are never stale.
        cutoff = (
            datetime.now(UTC) - timedelta(seconds=float(stale_after_s) + self._clock_skew_margin)
        ).isoformat()

        def stale(query: Query) -> Query:
            return query.not_.is_("worker_id", None).in_("status", _LIVE).lt("heartbeat_at", cutoff)

        now = utc_now()
        canceled = await self._rows(
            stale(
                self._runs().update(
                    {
                        "status": RunStatus.CANCELED.value,
                        "canceled_at": now,
                        "completed_at": now,
                        "error_message": CANCELED_MESSAGE,
                    }
                )
            )
            .is_("cancel_requested", True)
            .select("id"),
            "rescue cancel",
        )
        failed: list[str] = []
        spent = await self._rows(
            stale(self._runs().select("id,worker_id,attempt"))
            .or_(_NOT_CANCELED)
            .gte("attempt", max_attempts),
            "rescue scan",
        )
        for run in spent:
            message = (
                f"worker {run['worker_id']} stopped heartbeating; attempt {run['attempt']} "
                f"of {max_attempts} — giving up"
            )
            rows = await self._rows(
                stale(
                    self._runs().update(
                        {"status": RunStatus.FAILED.value, "completed_at": now, "error_message": message}
                    )
                )
                .eq("id", run["id"])
                .eq("worker_id", run["worker_id"])
                .eq("attempt", run["attempt"])
                .or_(_NOT_CANCELED)
                .select("id"),
                "rescue fail",
            )
            failed.extend(str(r["id"]) for r in rows)
        requeued = await self._rows(
            stale(
                self._runs().update(
                    {
                        "status": RunStatus.QUEUED.value,
                        "worker_id": None,
                        "started_at": None,
                        "heartbeat_at": None,
                    }
                )
            )
            .or_(_NOT_CANCELED)
            .lt("attempt", max_attempts)
            .select("id"),
            "rescue requeue",
        )
        offline = await self._rows(
            self._client.table(WORKERS)
            .update({"status": WorkerStatus.OFFLINE.value, "current_run": None, "current_runs": []})
            .lt("last_seen", cutoff)
            .or_("status.is.null,status.neq.offline,current_run.not.is.null")
            .select("worker_id"),
            "rescue workers",
        )
        report = RescueReport(
            requeued=tuple(str(r["id"]) for r in requeued),
            failed=(*failed, *(str(r["id"]) for r in canceled)),
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
        row = {
            "worker_id": worker.worker_id,
            "status": state.status.value,
            "last_seen": utc_now(),
            "host": worker.host,
            "gpus": list(worker.gpus),
            "version": worker.version,
            "slots": worker.slots,
            "current_run": state.current_runs[0] if state.current_runs else None,
            "current_runs": list(state.current_runs),
            **hardware_columns(worker),
            "free_slots": state.free_slots,
        }
        await self._rows(
            self._client.table(WORKERS).upsert(row, on_conflict="worker_id", returning=ReturnMethod.minimal),
            "worker registry",
        )

    async def largest_worker(self) -> int:
        rows = await self._rows(self._client.table(WORKERS).select("slots,gpus"), "worker registry read")
        return max((_gpus_for_one_run(row) for row in rows), default=0)

    async def submit(self, run: NewRun) -> str:
        row = {
            "status": RunStatus.QUEUED.value,
            "data_yaml": run.data_yaml,
            "base_model": run.base_model,
            "configuration": json_safe(run.configuration),
            "cancel_requested": False,
            **new_run_columns(run),
        }
        rows = await self._rows(self._runs().insert(row).select("id"), "submit")
        if not rows:
            raise BackendError("insert into training_runs returned no id")
        return str(rows[0]["id"])

    async def request_cancel(self, run_id: str) -> bool:
        rid = _uuid(run_id)
        if rid is None:
            return False
        rows = await self._rows(
            self._runs()
            .update({"cancel_requested": True})
            .eq("id", rid)
            .or_(f"status.is.null,status.not.in.({','.join(_TERMINAL)})")
            .select("id"),
            "request cancel",
        )
        return bool(rows)

    async def list_runs(self, limit: int = 20) -> list[RunRow]:
        rows = await self._rows(
            self._runs().select(ROW_COLUMNS).order("created_at", desc=True, nullsfirst=False).limit(limit),
            "list runs",
        )
        return [row for row in map(parse_row, rows) if row is not None]


def _gpus_for_one_run(row: dict[str, Any]) -> int:
    """The fewer of a worker row's slots and GPUs (rows are written by any version, or by hand)."""
    gpus = row.get("gpus")
    slots = row.get("slots")
    count = len(gpus) if isinstance(gpus, list) else 0
    return min(count, slots if isinstance(slots, int) and not isinstance(slots, bool) else 1)
