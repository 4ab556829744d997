"""The migration on a database that the old saturnos-trainer script already used."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from agent.backends.postgres.migrate import migrate
from agent.backends.postgres.store import PostgresStore
from agent.domain.status import RunStatus

if TYPE_CHECKING:
    from tests.pg import TestPostgres

LEGACY_SCHEMA = """
create table training_runs (
    id uuid primary key default gen_random_uuid(),
    created_at timestamptz default now(),
    status text,
    data_yaml text,
    base_model text,
    configuration jsonb,
    cancel_requested boolean default false,
    started_at timestamptz,
    completed_at timestamptz,
    canceled_at timestamptz,
    error_message text,
    worker_id text,
    trained_model_url text,
    results jsonb
);
create table trainer_workers (
    worker_id text primary key,
    status text,
    last_seen timestamptz
);
"""

LEGACY_COLUMNS = (
    "id, created_at, status, data_yaml, base_model, configuration, cancel_requested, started_at,"
    " completed_at, canceled_at, error_message, worker_id, trained_model_url, results"
)

RESULTS = {
    "progress": {"epoch": 50, "total_epochs": 50, "percent": 100.0, "eta_seconds": 0, "eta": "00:00:00"},
    "metrics": {"metrics/mAP50(B)": 0.71},
    "mAP": 0.71,
    "precision": 0.8,
    "recall": 0.65,
    "artifacts": [{"name": "best.pt", "path": "weights/best.pt", "url": "https://x/best.pt"}],
    "run_dir": "/srv/runs/abc",
}


def _legacy_rows(conn: psycopg.Connection[dict[str, Any]]) -> dict[str, str]:
    ids: dict[str, str] = {}
    rows: list[tuple[str, dict[str, Any]]] = [
        (
            "queued",
            {
                "status": "queued",
                "data_yaml": "/d/a.yaml",
                "base_model": "YOLOv8n",
                "configuration": Jsonb({"epochs": 10, "batchSize": 8}),
            },
        ),
        (
            "queued_string_config",
            {
                "status": "queued",
                "data_yaml": "/d/b.yaml",
                "configuration": Jsonb('{"epochs": 3}'),
                "cancel_requested": None,
            },
        ),
        (
            "running",
            {
                "status": "running",
                "data_yaml": "/d/c.yaml",
                "worker_id": "old-host-1",
                "started_at": "2024-05-01T10:00:00Z",
                "configuration": Jsonb({"epochs": 100}),
            },
        ),
        (
            "completed",
            {
                "status": "completed",
                "data_yaml": "/d/d.yaml",
                "worker_id": "old-host-2",
                "started_at": "2024-05-01T09:00:00Z",
                "completed_at": "2024-05-01T09:30:00Z",
                "trained_model_url": "https://x/best.pt",
                "results": Jsonb(RESULTS),
            },
        ),
        (
            "canceled",
            {
                "status": "canceled",
                "data_yaml": "/d/e.yaml",
                "cancel_requested": True,
                "canceled_at": "2024-05-02T09:00:00Z",
                "completed_at": "2024-05-02T09:00:00Z",
                "error_message": "Canceled by user.",
            },
        ),
    ]
    for name, fields in rows:
        cols = ", ".join(fields)
        marks = ", ".join(["%s"] * len(fields))
        record = conn.execute(
            f"insert into training_runs ({cols}) values ({marks}) returning id",  # type: ignore[arg-type]
            list(fields.values()),
        ).fetchone()
        assert record is not None
        ids[name] = str(record["id"])
    conn.execute("insert into trainer_workers values ('old-host-1', 'busy', '2024-05-01T10:05:00Z')")
    return ids


def _snapshot(
    conn: psycopg.Connection[dict[str, Any]], columns: str, table: str, key: str
) -> list[dict[str, Any]]:
    return conn.execute(f"select {columns} from {table} order by {key}").fetchall()  # type: ignore[arg-type]


async def test_migration_keeps_every_legacy_row_and_adds_the_new_columns(pg_server: TestPostgres) -> None:
    url = pg_server.empty_database()
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        conn.execute(LEGACY_SCHEMA)
        ids = _legacy_rows(conn)
        runs_before = _snapshot(conn, LEGACY_COLUMNS, "training_runs", "id")
        workers_before = _snapshot(conn, "worker_id, status, last_seen", "trainer_workers", "worker_id")

    await migrate(url)
    await migrate(url)

    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        assert _snapshot(conn, LEGACY_COLUMNS, "training_runs", "id") == runs_before
        assert (
            _snapshot(conn, "worker_id, status, last_seen", "trainer_workers", "worker_id") == workers_before
        )
        new = conn.execute("select attempt, heartbeat_at from training_runs").fetchall()
        assert new == [{"attempt": 0, "heartbeat_at": None}] * len(ids)
        worker_cols = {
            r["column_name"]
            for r in conn.execute(
                "select column_name from information_schema.columns where table_name = 'trainer_workers'"
            )
        }
        assert {"host", "gpus", "version", "slots", "current_run", "current_runs"} <= worker_cols
        inserted = conn.execute(
            "insert into training_runs (data_yaml) values ('/d/new.yaml') returning *"
        ).fetchone()
        assert inserted is not None
        assert (inserted["status"], inserted["attempt"], inserted["cancel_requested"]) == ("queued", 0, False)

    store = await PostgresStore.connect(url)
    try:
        poll = await store.poll(10)
        assert ids["queued"] in poll.claimable and ids["queued_string_config"] in poll.claimable
        assert ids["running"] not in poll.claimable

        claim = await store.claim(ids["queued"], "new-agent")
        assert claim is not None and claim.lease.attempt == 1
        assert claim.row.configuration == {"epochs": 10, "batchSize": 8}
        string_config = await store.get(ids["queued_string_config"])
        assert string_config is not None and string_config.configuration == '{"epochs": 3}'

        completed = await store.get(ids["completed"])
        assert completed is not None and completed.status is RunStatus.COMPLETED
        assert completed.results == RESULTS and completed.trained_model_url == "https://x/best.pt"

        # The old script's running run has no heartbeat: it is not rescued from under a live script.
        assert (await store.rescue_stale(stale_after_s=1, max_attempts=3)).requeued == ()
        running = await store.get(ids["running"])
        assert (
            running is not None and running.status is RunStatus.RUNNING and running.worker_id == "old-host-1"
        )
    finally:
        await store.close()
