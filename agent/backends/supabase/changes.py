"""`postgres_changes` payloads read as hints, and the bindings an agent subscribes with.

Bindings are filtered on the server to what this agent acts on, because Realtime counts one event
per subscription per change against the project's quota and, over it, skips every change of the
project without a word (see tests/standin/quota.py). The agent's channel has:

- INSERT, unfiltered: every new run is a candidate;
- UPDATE `status=eq.queued`: runs put back to claimable (rescued, released), and a cancel of an
  unclaimed run written by `saturnos-agent cancel` (status stays queued);
- UPDATE `cancel_requested=eq.true`: a cancel of an unclaimed run as the app writes it
  (`status='canceling', cancel_requested=true`); it also carries the few writes of a run while it
  is being canceled, whoever owns it: a handful per cancel, not a stream;
- DELETE, unfiltered: a deleted row carries only its key, so Realtime matches a filter on
  worker_id against nothing and fails closed; deletes are rare (a project deleted in the app);
- `*` on trainer_workers `worker_id=eq.<me>`: my registry row, written every HEARTBEAT_INTERVAL,
  echoed back even when the agent has no run: the proof that the stream is alive (events.py).

Each run the agent holds gets a channel of its own with one binding, UPDATE `id=eq.<run>`, for as
long as it holds it (`run_bindings`). Realtime checks an UPDATE's filter against the new row only,
so a binding on `worker_id=eq.<me>` would miss the one update that matters most: another worker's
claim (the old script claims without a condition), whose new row names that worker. The run's id
never changes, so every update of the run reaches its holder: cancels, a project delete's
`canceled`, the app's `stopped`, a takeover, and its own progress writes, which cost one event
each, as the echo of `worker_id=eq.<me>` did before. Only `eq` is used: every server version has
it. Other agents' progress writes match none of these filters and never reach this agent. The
filtering below stays as a second line: a server that ignored filters would still not make
progress writes into hints.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from agent.backends.supabase.rows import parse_row
from agent.domain.run import Hint, HintOp
from agent.domain.status import RunStatus, is_claimable

ChangeEvent = Literal["INSERT", "UPDATE", "DELETE", "*"]
_OPS: dict[str, HintOp] = {"INSERT": "INSERT", "UPDATE": "UPDATE", "DELETE": "DELETE"}


@dataclass(frozen=True)
class Binding:
    """One `postgres_changes` binding of the agent's channel."""

    event: ChangeEvent
    table: str
    filter: str | None = None
    schema: str = "public"


def agent_bindings(
    worker_id: str | None, runs: str = "training_runs", workers: str = "trainer_workers"
) -> list[Binding]:
    """The bindings of one agent; without a worker id, the unfiltered INSERT and UPDATE of old."""
    if worker_id is None:
        return [Binding("INSERT", runs), Binding("UPDATE", runs)]
    return [
        Binding("INSERT", runs),
        Binding("UPDATE", runs, "status=eq.queued"),
        Binding("UPDATE", runs, "cancel_requested=eq.true"),
        Binding("DELETE", runs),
        Binding("*", workers, f"worker_id=eq.{worker_id}"),
    ]


def run_bindings(run_id: str, runs: str = "training_runs") -> list[Binding]:
    """The bindings of the channel that follows one run this agent holds."""
    return [Binding("UPDATE", runs, f"id=eq.{run_id}")]


def change_data(payload: object) -> dict[str, Any] | None:
    """The `data` of a `postgres_changes` payload, if it has one."""
    if not isinstance(payload, dict):
        return None
    data = payload.get("data")
    return data if isinstance(data, dict) else None


def change_errors(data: dict[str, Any]) -> tuple[str, ...]:
    """The `errors` apply_rls attached to a change (`Error 401: Unauthorized`, `Error 413: …`)."""
    errors = data.get("errors")
    if isinstance(errors, str):
        return (errors,)
    if isinstance(errors, list):
        return tuple(str(e) for e in errors if e)
    return ()


_WATCHED = ("status", "cancel_requested", "worker_id", "started_at")
# What a claim decision reads of a row. Realtime leaves out a value over 64 bytes when the
# record is too big (and says `Error 413`): then the agent reads the row instead.
_IMAGE_KEYS = (
    "id",
    "status",
    "data_yaml",
    "base_model",
    "configuration",
    "cancel_requested",
    "worker_id",
    "started_at",
)
_OWNED = frozenset({RunStatus.RUNNING.value, RunStatus.CANCELING.value})


def _same_time(a: object, b: object) -> bool:
    if a is None or b is None:
        return a is b
    try:
        return datetime.fromisoformat(str(a)) == datetime.fromisoformat(str(b))
    except ValueError:
        return str(a) == str(b)


def _change_type(data: dict[str, Any]) -> str:
    # realtime-py validates the payload: `type` arrives as a str enum, whose str() is its name.
    kind = data.get("type")
    return str(getattr(kind, "value", kind))


def is_progress_write(payload: object) -> bool:
    """An UPDATE that changed none of the columns agents act on (a heartbeat or progress write)."""
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), dict):
        return False
    data = payload["data"]
    record, old = data.get("record"), data.get("old_record")
    if _change_type(data) != "UPDATE" or not isinstance(record, dict):
        return False
    # With the old row image (replica identity full), compare the columns. Without it, an owned
    # run with no cancel request whose heartbeat differs from its start is a progress write: a
    # claim writes both stamps with one value, and every other change agents act on alters status
    # or cancel_requested.
    if isinstance(old, dict) and all(key in old for key in _WATCHED):
        return all(
            _same_time(old.get(k), record.get(k)) if k == "started_at" else old.get(k) == record.get(k)
            for k in _WATCHED
        )
    return (
        record.get("status") == RunStatus.RUNNING.value
        and record.get("worker_id") is not None
        and record.get("cancel_requested") is not True
        and record.get("started_at") is not None
        and not _same_time(record.get("started_at"), record.get("heartbeat_at"))
    )


def is_own_write(hint: Hint, worker_id: str | None) -> bool:
    """A held run's update that leaves it running, mine and uncanceled: my heartbeat or progress."""
    return (
        hint.op == "UPDATE"
        and hint.worker_id is not None
        and hint.worker_id == worker_id
        and hint.status == RunStatus.RUNNING
        and not hint.cancel_requested
    )


def hint_from_change(payload: object) -> Hint | None:
    """A `postgres_changes` payload as a Hint, from the row image in `data.record`; None if unusable."""
    if not isinstance(payload, dict):
        return None
    data = payload.get("data")
    if not isinstance(data, dict):
        return None
    op = _OPS.get(_change_type(data))
    record = data.get("record") if op != "DELETE" else data.get("old_record")
    if op is None or not isinstance(record, dict) or not record.get("id"):
        return None
    raw_status = record.get("status")
    try:
        status: RunStatus | None = RunStatus(str(raw_status))
    except ValueError:
        status = None
    worker = record.get("worker_id")
    cancel = record.get("cancel_requested")
    attempt = record.get("attempt")
    claimable = op != "DELETE" and is_claimable(
        raw_status if isinstance(raw_status, str) else None,
        record.get("started_at"),
        worker if isinstance(worker, str) else None,
        cancel if isinstance(cancel, bool) else None,
    )
    # Only a claim decision reads the image: a new claimable run, carried whole.
    whole = claimable and op == "INSERT" and not change_errors(data) and all(k in record for k in _IMAGE_KEYS)
    return Hint(
        run_id=str(record["id"]),
        op=op,
        claimable=claimable,
        cancel_requested=cancel is True,
        worker_id=str(worker) if worker is not None else None,
        status=status,
        raw_status=str(raw_status)[:64] if raw_status is not None else None,
        attempt=attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else None,
        image=parse_row(record) if whole else None,
    )
