"""An in-process RunStore and RunAdmin with the postgres backend's semantics, for fast tests."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, assert_never

from loguru import logger

from agent.domain.errors import BackendError, BackendUnavailable
from agent.domain.run import (
    CANCELED_MESSAGE,
    Canceled,
    Claimed,
    Completed,
    Failed,
    Hint,
    HintOp,
    JsonDict,
    Lease,
    NewRun,
    Outcome,
    PollResult,
    Pulse,
    RescueReport,
    RunRow,
    WorkerInfo,
    WorkerState,
    json_safe,
    new_run_columns,
)
from agent.domain.status import RunStatus, is_claimable
from agent.domain.untrusted import Unreadable, load_json

Clock = Callable[[], datetime]
ChangeWatcher = Callable[[Hint], object]

_OWNED = ("running", "canceling")
_CLAIMABLE = ("queued", "running")
_TERMINAL = ("completed", "failed", "canceled")
# The columns whose change makes the schema's trigger send a NOTIFY.
_NOTIFY_FIELDS = ("status", "cancel_requested", "worker_id", "started_at")


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _as_jsonb(value: Any) -> Any:
    """A detached copy as Postgres would store it in a jsonb column."""
    return json.loads(json.dumps(json_safe(value)))


def _read_jsonb(value: Any) -> Any:
    """A stored json column as the agent reads it: within limits, like the real stores decode it."""
    try:
        return load_json(json.dumps(json_safe(value)))
    except (RecursionError, ValueError, TypeError) as exc:
        return Unreadable(f"is not readable JSON ({type(exc).__name__})")


@dataclass
class Record:
    """One mutable row; status is a plain string, so tests can store statuses the agent does not know."""

    id: str
    created_at: datetime
    seq: int
    status: str | None = "queued"
    data_yaml: str | None = None
    base_model: str | None = None
    configuration: object = None
    cancel_requested: bool | None = False
    worker_id: str | None = None
    attempt: int = 0
    started_at: datetime | None = None
    heartbeat_at: datetime | None = None
    completed_at: datetime | None = None
    canceled_at: datetime | None = None
    error_message: str | None = None
    trained_model_url: str | None = None
    results: object = None
    run_name: str | None = None
    project_id: str | None = None
    step_id: str | None = None

    @property
    def claimable(self) -> bool:
        return is_claimable(self.status, self.started_at, self.worker_id, self.cancel_requested)

    def owned_by(self, lease: Lease) -> bool:
        return self.worker_id == lease.worker_id and self.attempt == lease.attempt and self.status in _OWNED


@dataclass
class WorkerRecord:
    worker_id: str
    status: str
    last_seen: datetime
    host: str | None = None
    gpus: list[str] = field(default_factory=list)
    version: str | None = None
    slots: int | None = None
    current_run: str | None = None
    current_runs: list[str] = field(default_factory=list)
    device_type: str | None = None
    compute_type: str | None = None
    gpu_name: str | None = None
    gpu_memory_gb: float | None = None
    cpu_model: str | None = None
    ram_gb: float | None = None
    free_slots: int | None = None


@dataclass
class _Fault:
    error: Exception
    remaining: int
    ops: frozenset[str] | None


def _row(rec: Record) -> RunRow | None:
    try:
        status = RunStatus(str(rec.status))
    except ValueError:
        logger.bind(run_id=rec.id, status=rec.status).warning("skipping a run with an unknown status")
        return None
    return RunRow(
        id=rec.id,
        status=status,
        data_yaml=rec.data_yaml,
        base_model=rec.base_model,
        configuration=_read_jsonb(rec.configuration),
        cancel_requested=bool(rec.cancel_requested),
        worker_id=rec.worker_id,
        attempt=rec.attempt,
        created_at=rec.created_at,
        started_at=rec.started_at,
        heartbeat_at=rec.heartbeat_at,
        completed_at=rec.completed_at,
        canceled_at=rec.canceled_at,
        error_message=rec.error_message,
        trained_model_url=rec.trained_model_url,
        results=results if isinstance(results := _read_jsonb(rec.results), dict) else None,
    )


def _merged(results: object, patch: Mapping[str, Any]) -> JsonDict:
    base = dict(results) if isinstance(results, dict) else {}
    base.update(_as_jsonb(dict(patch)))
    return base


class MemoryStore:
    """`training_runs` and `trainer_workers` in dicts, with hooks for tests; every call is atomic."""

    # Hooks: insert_row and set_fields write rows directly (the attempt and notify rules still
    # apply), fail_next makes the next calls raise, clock decides what "now" is, and watch feeds
    # the changes that MemoryEvents turns into hints.

    def __init__(self, clock: Clock = _utcnow) -> None:
        self.clock = clock
        self.runs: dict[str, Record] = {}
        self.workers: dict[str, WorkerRecord] = {}
        self._watchers: list[ChangeWatcher] = []
        self._faults: list[_Fault] = []
        # Calls per method, failed ones included: tests wait on these instead of on time.
        self.calls: Counter[str] = Counter()
        self._seq = 0

    def watch(self, watcher: ChangeWatcher) -> Callable[[], None]:
        """Call `watcher` with a hint for each change the trigger would NOTIFY; returns an unsubscribe."""
        self._watchers.append(watcher)
        return lambda: self._watchers.remove(watcher) if watcher in self._watchers else None

    def fail_next(
        self, error: Exception | None = None, times: int = 1, ops: Iterable[str] | None = None
    ) -> None:
        """Make the next `times` calls (of the named methods, or any) raise `error`."""
        self._faults.append(
            _Fault(
                error or BackendUnavailable("injected failure"),
                times,
                frozenset(ops) if ops is not None else None,
            )
        )

    def heal(self) -> None:
        """Drop every injected failure still pending (the backend is back)."""
        self._faults.clear()

    async def _io(self, op: str) -> None:
        # Yield like a network round trip would, so that concurrent callers really interleave.
        await asyncio.sleep(0)
        self.calls[op] += 1
        for fault in self._faults:
            if fault.remaining > 0 and (fault.ops is None or op in fault.ops):
                fault.remaining -= 1
                if fault.remaining == 0:
                    self._faults.remove(fault)
                raise fault.error

    def insert_row(self, **fields: Any) -> str:
        """Insert a row as a web app (or the old script) would; unknown statuses are allowed."""
        self._seq += 1
        run_id = str(fields.pop("id", None) or uuid.uuid4())
        if run_id in self.runs:
            raise BackendError(f"duplicate key: training_runs.id={run_id}")
        rec = Record(id=run_id, created_at=fields.pop("created_at", None) or self.clock(), seq=self._seq)
        for name, value in fields.items():
            self._check_field(name)
            setattr(rec, name, value)
        self.runs[run_id] = rec
        self._notify(rec, "INSERT")
        return run_id

    def set_fields(self, run_id: str, **fields: Any) -> None:
        """Update columns directly, as an SQL UPDATE would (attempt and notify rules apply)."""
        self._update(self.runs[run_id], **fields)

    def delete_row(self, run_id: str) -> None:
        """Delete a row, as the web app's delete button or its project-delete trigger does."""
        rec = self.runs.pop(run_id)
        self._notify(rec, "DELETE")

    @staticmethod
    def _check_field(name: str) -> None:
        if name not in {f.name for f in dataclasses.fields(Record)} or name in ("seq",):
            raise BackendError(f"training_runs has no column {name!r}")

    def _update(self, rec: Record, **changes: Any) -> None:
        before = {name: getattr(rec, name) for name in _NOTIFY_FIELDS}
        for name, value in changes.items():
            self._check_field(name)
            setattr(rec, name, value)
        if before["worker_id"] is None and rec.worker_id is not None:
            rec.attempt += 1
        if any(before[name] != getattr(rec, name) for name in _NOTIFY_FIELDS):
            self._notify(rec, "UPDATE")

    def _notify(self, rec: Record, op: HintOp) -> None:
        try:
            status: RunStatus | None = RunStatus(str(rec.status))
        except ValueError:
            status = None
        hint = Hint(
            run_id=rec.id,
            op=op,
            claimable=rec.claimable,
            cancel_requested=rec.cancel_requested is True,
            worker_id=rec.worker_id,
            status=status,
            raw_status=rec.status,
            attempt=rec.attempt,
        )
        for watcher in list(self._watchers):
            watcher(hint)

    def _get(self, run_id: str) -> Record | None:
        return self.runs.get(str(run_id))

    def _oldest(self, predicate: Callable[[Record], bool], limit: int) -> tuple[str, ...]:
        matching = sorted(filter(predicate, self.runs.values()), key=lambda r: (r.created_at, r.seq))
        return tuple(r.id for r in matching[:limit])

    async def poll(self, limit: int) -> PollResult:
        await self._io("poll")
        return PollResult(
            claimable=self._oldest(lambda r: r.claimable, limit),
            cancel_unclaimed=self._oldest(
                lambda r: r.status in _CLAIMABLE and r.worker_id is None and r.cancel_requested is True, limit
            ),
        )

    async def claim(self, run_id: str, worker_id: str) -> Claimed | None:
        await self._io("claim")
        rec = self._get(run_id)
        if rec is None or not rec.claimable:
            return None
        now = self.clock()
        self._update(rec, status="running", worker_id=worker_id, started_at=now, heartbeat_at=now)
        row = _row(rec)
        assert row is not None
        return Claimed(Lease(rec.id, worker_id, rec.attempt), row)

    async def get(self, run_id: str) -> RunRow | None:
        await self._io("get")
        rec = self._get(run_id)
        return None if rec is None else _row(rec)

    def _owned(self, lease: Lease) -> Record | None:
        rec = self._get(lease.run_id)
        return rec if rec is not None and rec.owned_by(lease) else None

    async def touch(self, lease: Lease, results: Mapping[str, Any] | None = None) -> Pulse | None:
        await self._io("touch")
        rec = self._owned(lease)
        if rec is None:
            return None
        changes: dict[str, Any] = {"heartbeat_at": self.clock()}
        if results:
            changes["results"] = _merged(rec.results, results)
        self._update(rec, **changes)
        return Pulse(cancel_requested=rec.cancel_requested is True)

    async def mark_canceling(self, lease: Lease) -> bool:
        await self._io("mark_canceling")
        rec = self._owned(lease)
        if rec is None:
            return False
        self._update(rec, status="canceling", heartbeat_at=self.clock())
        return True

    async def finish(self, lease: Lease, outcome: Outcome) -> bool:
        await self._io("finish")
        rec = self._get(lease.run_id)
        if rec is None:
            return False
        if isinstance(outcome, Completed):
            status = "completed"
        elif isinstance(outcome, Failed):
            status = "failed"
        elif isinstance(outcome, Canceled):
            status = "canceled"
        else:
            assert_never(outcome)
        if not rec.owned_by(lease):
            # A retry whose first try landed: the row already shows this lease's outcome.
            return rec.worker_id == lease.worker_id and rec.attempt == lease.attempt and rec.status == status
        now = self.clock()
        if isinstance(outcome, Completed):
            self._update(
                rec,
                status=status,
                completed_at=now,
                trained_model_url=outcome.trained_model_url,
                results=_merged(rec.results, outcome.results),
            )
        elif isinstance(outcome, Failed):
            self._update(
                rec,
                status=status,
                completed_at=now,
                error_message=outcome.error_message,
                results=_merged(rec.results, outcome.results),
            )
        else:
            self._update(
                rec, status=status, canceled_at=now, completed_at=now, error_message=outcome.error_message
            )
        return True

    async def release(self, lease: Lease) -> bool:
        await self._io("release")
        rec = self._owned(lease)
        if rec is None:
            return False
        self._update(rec, status="queued", worker_id=None, started_at=None, heartbeat_at=None)
        return True

    async def cancel_unclaimed(self, run_id: str) -> bool:
        await self._io("cancel_unclaimed")
        rec = self._get(run_id)
        unclaimed = rec is not None and rec.status in _CLAIMABLE and rec.worker_id is None
        if rec is None or not unclaimed or rec.cancel_requested is not True:
            return False
        now = self.clock()
        self._update(
            rec, status="canceled", canceled_at=now, completed_at=now, error_message=CANCELED_MESSAGE
        )
        return True

    async def rescue_stale(self, stale_after_s: float, max_attempts: int) -> RescueReport:
        """Requeue or end stale owned runs; canceled ones are reported in `failed`, as in postgres."""
        await self._io("rescue_stale")
        now = self.clock()
        cutoff = now - timedelta(seconds=stale_after_s)
        stale = [
            r
            for r in self.runs.values()
            if r.worker_id is not None
            and r.status in _OWNED
            and r.heartbeat_at is not None
            and r.heartbeat_at < cutoff
        ]
        requeued: list[str] = []
        canceled: list[str] = []
        failed: list[str] = []
        for rec in stale:
            if rec.cancel_requested is True:
                self._update(
                    rec, status="canceled", canceled_at=now, completed_at=now, error_message=CANCELED_MESSAGE
                )
                canceled.append(rec.id)
            elif rec.attempt >= max_attempts:
                message = (
                    f"worker {rec.worker_id} stopped heartbeating; attempt {rec.attempt} of {max_attempts}"
                    " — giving up"
                )
                self._update(rec, status="failed", completed_at=now, error_message=message)
                failed.append(rec.id)
            else:
                self._update(rec, status="queued", worker_id=None, started_at=None, heartbeat_at=None)
                requeued.append(rec.id)
        offline: list[str] = []
        for worker in self.workers.values():
            busy = worker.status != "offline" or worker.current_run is not None or worker.current_runs
            if worker.last_seen < cutoff and busy:
                worker.status, worker.current_run, worker.current_runs = "offline", None, []
                offline.append(worker.worker_id)
        return RescueReport(
            requeued=tuple(requeued), failed=(*failed, *canceled), offline_workers=tuple(offline)
        )

    async def register_worker(self, worker: WorkerInfo, state: WorkerState) -> None:
        await self._io("register_worker")
        self.workers[worker.worker_id] = WorkerRecord(
            worker_id=worker.worker_id,
            status=state.status.value,
            last_seen=self.clock(),
            host=worker.host,
            gpus=list(worker.gpus),
            version=worker.version,
            slots=worker.slots,
            current_run=state.current_runs[0] if state.current_runs else None,
            current_runs=list(state.current_runs),
            device_type=worker.device_type,
            compute_type=worker.compute_type,
            gpu_name=worker.gpu_name,
            gpu_memory_gb=worker.gpu_memory_gb,
            cpu_model=worker.cpu_model,
            ram_gb=worker.ram_gb,
            free_slots=state.free_slots,
        )

    async def largest_worker(self) -> int:
        await self._io("largest_worker")
        return max((min(len(w.gpus), w.slots or 1) for w in self.workers.values()), default=0)

    async def submit(self, run: NewRun) -> str:
        await self._io("submit")
        return self.insert_row(
            status="queued",
            data_yaml=run.data_yaml,
            base_model=run.base_model,
            configuration=_as_jsonb(run.configuration),
            cancel_requested=False,
            **new_run_columns(run, self.clock()),
        )

    async def request_cancel(self, run_id: str) -> bool:
        await self._io("request_cancel")
        rec = self._get(run_id)
        if rec is None or (rec.status or "") in _TERMINAL:
            return False
        self._update(rec, cancel_requested=True)
        return True

    async def list_runs(self, limit: int = 20) -> list[RunRow]:
        await self._io("list_runs")
        newest = sorted(self.runs.values(), key=lambda r: (r.created_at, r.seq), reverse=True)[:limit]
        return [row for row in map(_row, newest) if row is not None]
