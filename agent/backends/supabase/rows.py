"""Rows of `training_runs` as PostgREST and Realtime send them, read as RunRows within limits."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from loguru import logger

from agent.domain.run import RunRow
from agent.domain.status import RunStatus
from agent.domain.untrusted import Unreadable, json_problem, load_json


def read_time(value: object) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def json_column(value: object) -> object:
    """A json column read as text (`::text`) decoded within limits; a decoded one checked."""
    if isinstance(value, str):
        return load_json(value)
    problem = json_problem(value)
    return Unreadable(problem) if problem else value


def text_column(value: object) -> str | None:
    return value if value is None or isinstance(value, str) else str(value)


def parse_row(record: Mapping[str, Any]) -> RunRow | None:
    """A PostgREST row as a RunRow; None (with a warning) for a status the agent does not know."""
    try:
        status = RunStatus(str(record.get("status")))
    except ValueError:
        logger.bind(run_id=str(record.get("id")), status=str(record.get("status"))).warning(
            "skipping a run with an unknown status"
        )
        return None
    results = json_column(record.get("results"))
    return RunRow(
        id=str(record["id"]),
        status=status,
        data_yaml=text_column(record.get("data_yaml")),
        base_model=text_column(record.get("base_model")),
        configuration=json_column(record.get("configuration")),
        cancel_requested=bool(record.get("cancel_requested")),
        worker_id=record.get("worker_id"),
        attempt=int(record.get("attempt") or 0),
        created_at=read_time(record.get("created_at")),
        started_at=read_time(record.get("started_at")),
        heartbeat_at=read_time(record.get("heartbeat_at")),
        completed_at=read_time(record.get("completed_at")),
        canceled_at=read_time(record.get("canceled_at")),
        error_message=record.get("error_message"),
        trained_model_url=record.get("trained_model_url"),
        results=results if isinstance(results, dict) else None,
    )
