"""Pure parts of the supabase backend: change payloads into hints, failures into domain errors."""

from __future__ import annotations

import json

import httpx
import pytest
from postgrest import APIError
from realtime.types import RealtimePostgresChangesListenEvent
from storage3.exceptions import StorageApiError

from agent.backends.supabase import ServerUnavailable, hint_from_change, parse_row
from agent.backends.supabase.events import is_progress_write
from agent.backends.supabase.sources import _entry, origin_of
from agent.backends.supabase.transport import translate
from agent.domain.errors import BackendError, BackendUnavailable, NotFound
from agent.domain.run import json_safe
from agent.domain.status import RunStatus
from agent.domain.untrusted import Unreadable

RUN = "5f0c1d2e-0000-4000-8000-000000000001"
T0 = "2025-01-01T00:00:00.123456+00:00"
T1 = "2025-01-01T00:00:02.5+00:00"


def change(kind: str, **record: object) -> dict[str, object]:
    return {
        "ids": [1],
        "data": {
            "schema": "public",
            "table": "training_runs",
            "commit_timestamp": "2025-01-01T00:00:00Z",
            "type": kind,
            "columns": [],
            "errors": None,
            "record": {"id": RUN, **record},
            "old_record": {"id": RUN},
        },
    }


def test_an_insert_of_a_queued_run_is_a_claimable_hint() -> None:
    hint = hint_from_change(
        change("INSERT", status="queued", started_at=None, worker_id=None, cancel_requested=False)
    )
    assert hint is not None
    assert (hint.run_id, hint.op, hint.claimable, hint.cancel_requested) == (RUN, "INSERT", True, False)
    assert hint.status is RunStatus.QUEUED and hint.worker_id is None


WHOLE = {
    "status": "queued",
    "data_yaml": "/data/a.yaml",
    "base_model": "YOLOv8n",
    "configuration": {"epochs": 3, "device": "0,1"},
    "cancel_requested": False,
    "worker_id": None,
    "started_at": None,
}


def test_an_insert_carrying_the_whole_row_gives_its_image_for_the_claim_decision() -> None:
    hint = hint_from_change(change("INSERT", **WHOLE))
    assert hint is not None and hint.image is not None
    assert (hint.image.id, hint.image.configuration, hint.image.base_model) == (
        RUN,
        {"epochs": 3, "device": "0,1"},
        "YOLOv8n",
    )


@pytest.mark.parametrize(
    "configuration",
    [
        {"epochs": 3, "junk": "x" * 200_000},
        {"epochs": 3, "deep": json.loads('{"a":' * 40 + "1" + "}" * 40)},
        {f"k{i}": i for i in range(3000)},
    ],
)
def test_an_image_from_an_event_is_held_to_the_row_limits(configuration: dict[str, object]) -> None:
    # The event's record comes decoded: the same limits as a row read through the store apply.
    hint = hint_from_change(change("INSERT", **{**WHOLE, "configuration": configuration}))
    assert hint is not None and hint.image is not None
    assert isinstance(hint.image.configuration, Unreadable)


def test_no_image_for_a_run_that_is_not_claimable() -> None:
    taken = change("INSERT", **{**WHOLE, "worker_id": "w9", "started_at": T0})
    assert (hint := hint_from_change(taken)) is not None and not hint.claimable and hint.image is None


def test_no_image_from_an_update_or_a_record_realtime_cut_short() -> None:
    assert (hint := hint_from_change(change("UPDATE", **WHOLE))) is not None and hint.image is None
    # Over Realtime's record size it leaves out the big values and says so.
    cut = change("INSERT", **{k: v for k, v in WHOLE.items() if k != "configuration"})
    cut["data"]["errors"] = ["Error 413: Payload Too Large"]  # type: ignore[index]
    assert (hint := hint_from_change(cut)) is not None and hint.image is None
    missing = change("INSERT", **{k: v for k, v in WHOLE.items() if k != "configuration"})
    assert (hint := hint_from_change(missing)) is not None and hint.image is None
    assert hint.claimable


@pytest.mark.parametrize(
    ("record", "claimable"),
    [
        ({"status": "running", "started_at": None, "worker_id": None, "cancel_requested": None}, True),
        ({"status": "running", "started_at": "2025-01-01T00:00:00+00:00", "worker_id": None}, False),
        ({"status": "queued", "worker_id": "w1"}, False),
        ({"status": "queued", "cancel_requested": True}, False),
        ({"status": "completed"}, False),
        ({"status": "something-new"}, False),
    ],
)
def test_claimable_follows_the_row_contract(record: dict[str, object], claimable: bool) -> None:
    hint = hint_from_change(change("UPDATE", **record))
    assert hint is not None and hint.claimable is claimable


def test_a_cancel_update_carries_the_cancel_and_the_owner() -> None:
    hint = hint_from_change(change("UPDATE", status="running", worker_id="w1", cancel_requested=True))
    assert hint is not None
    assert (hint.op, hint.cancel_requested, hint.worker_id, hint.status) == (
        "UPDATE",
        True,
        "w1",
        RunStatus.RUNNING,
    )


@pytest.mark.parametrize(
    "payload",
    [
        None,
        {},
        {"data": None},
        {"data": {"type": "INSERT"}},
        {"data": {"type": "TRUNCATE", "record": {"id": RUN}}},
    ],
)
def test_malformed_payloads_give_no_hint(payload: object) -> None:
    assert hint_from_change(payload) is None


def test_rows_parse_timestamps_and_skip_unknown_statuses() -> None:
    row = parse_row(
        {
            "id": RUN,
            "status": "running",
            "attempt": 2,
            "started_at": "2025-01-01T00:00:00.5+00:00",
            "results": [1],
        }
    )
    assert row is not None and row.attempt == 2 and row.results is None
    assert row.started_at is not None and row.started_at.microsecond == 500000
    assert parse_row({"id": RUN, "status": "paused"}) is None


def test_failures_translate_by_status() -> None:
    assert isinstance(translate(ServerUnavailable(503, "PATCH", "u", ""), "x"), BackendUnavailable)
    assert isinstance(translate(httpx.ReadTimeout("slow"), "x"), BackendUnavailable)
    assert isinstance(translate(httpx.ConnectError("refused"), "x"), BackendUnavailable)
    assert isinstance(translate(APIError({"code": "22P02", "message": "bad uuid"}), "x"), BackendError)
    assert isinstance(translate(StorageApiError("Object not found", "not_found", "404"), "x"), NotFound)
    assert isinstance(translate(StorageApiError("busy", "InternalError", 502), "x"), BackendUnavailable)
    denied = translate(StorageApiError("denied", "Unauthorized", 403), "x")
    assert isinstance(denied, BackendError) and not isinstance(denied, (NotFound, BackendUnavailable))


def test_storage_listing_entries() -> None:
    assert _entry({"name": "train", "id": None, "metadata": None}) == ("train", True, None)
    assert _entry({"name": "a.jpg", "id": "x", "metadata": {"size": 12}}) == ("a.jpg", False, 12)
    assert _entry({"name": ".emptyFolderPlaceholder", "id": "x", "metadata": {"size": 0}}) is None
    assert _entry({"name": "..", "id": None}) is None
    assert _entry({"name": "a/b", "id": "x"}) is None


def test_origins_and_json_safety() -> None:
    assert origin_of("HTTPS://Abc.Supabase.co/") == "https://abc.supabase.co"
    assert json_safe({"a": [float("nan"), 1.5], "b": float("inf")}) == {"a": [None, 1.5], "b": None}


def test_payloads_as_realtime_py_hands_them_over() -> None:
    # The client validates frames with pydantic: `type` arrives as a str enum, not a plain string.
    payload = change("UPDATE", status="running", worker_id="w1", started_at="2025-01-01T00:00:00+00:00")
    payload["data"]["type"] = RealtimePostgresChangesListenEvent.Update  # type: ignore[index]
    hint = hint_from_change(payload)
    assert hint is not None and hint.op == "UPDATE" and hint.worker_id == "w1"


@pytest.mark.parametrize(
    ("record", "old", "progress"),
    [
        # Without the old row image: judged by the row image.
        ({"status": "running", "worker_id": "w1", "started_at": T0, "heartbeat_at": T1}, {"id": RUN}, True),
        ({"status": "running", "worker_id": "w1", "started_at": T0, "heartbeat_at": T0}, {"id": RUN}, False),
        (
            {"status": "canceling", "worker_id": "w1", "started_at": T0, "heartbeat_at": T1},
            {"id": RUN},
            False,
        ),
        (
            {
                "status": "running",
                "worker_id": "w1",
                "started_at": T0,
                "heartbeat_at": T1,
                "cancel_requested": True,
            },
            {"id": RUN},
            False,
        ),
        # With it (replica identity full): only the columns agents act on count.
        (
            {"status": "running", "worker_id": "w1", "started_at": T0, "cancel_requested": False},
            {"status": "running", "worker_id": "w1", "started_at": T0, "cancel_requested": False},
            True,
        ),
        (
            {"status": "running", "worker_id": "w1", "started_at": T0, "cancel_requested": True},
            {"status": "running", "worker_id": "w1", "started_at": T0, "cancel_requested": False},
            False,
        ),
    ],
)
def test_progress_writes_are_recognised(
    record: dict[str, object], old: dict[str, object], progress: bool
) -> None:
    payload = change("UPDATE", **record)
    payload["data"]["old_record"] = old  # type: ignore[index]
    assert is_progress_write(payload) is progress
