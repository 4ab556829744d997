"""Runs inserted as the web app inserts them, on its schema, read the way its pages read them.

Real agents (`python -m agent run`) on a database with the app's schema under the agent's. Rows are
written through the app's row-level security as the `anon` role, as its browser client does.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from tests.acceptance.agentproc import AgentProc, base_env, fetch_run, wait_status
from tests.acceptance.test_lifecycle import pid_alive, trainer_pid
from tests.appschema import payloads
from tests.appschema.appview import AppView, app_view
from tests.util import wait_for_sync

CANCEL_BOUND = 3.0  # seconds from the change to the trainer gone; measured well under one
LOST = "lease lost (run taken away or deleted): dropped without a final write"


def started(database_url: str, tmp_path: Path, **env: str) -> Iterator[AgentProc]:
    proc = AgentProc(
        base_env(database_url, tmp_path / "w1", WORKER_ID="w1", **env), tmp_path / "w1.log"
    ).start()
    try:
        yield proc.wait_ready()
    finally:
        proc.kill()


@pytest.fixture
def agent(app_database_url: str, tmp_path: Path) -> Iterator[AgentProc]:
    yield from started(app_database_url, tmp_path)


@pytest.fixture
def events_only_agent(app_database_url: str, tmp_path: Path) -> Iterator[AgentProc]:
    """No fenced write for 20 s once training runs: only an event can stop a run sooner."""
    yield from started(
        app_database_url, tmp_path, PROGRESS_INTERVAL="20", HEARTBEAT_INTERVAL="20", STALE_AFTER="120"
    )


def as_app(database_url: str, statement: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    """One statement as the web app's browser client runs it: role anon, through its policies."""
    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        conn.execute("set role anon")
        cur = conn.execute(statement.encode(), params)
        return cur.fetchall() if cur.description else []


def project_and_step(database_url: str) -> tuple[str, str]:
    project = as_app(database_url, "insert into projects (name) values ('Bolts') returning id")[0]["id"]
    step = as_app(
        database_url,
        "insert into sop_steps (project_id, title, classes)"
        " values (%s, 'Inspect bolt', '{bolt}') returning id",
        (project,),
    )[0]["id"]
    return str(project), str(step)


def insert_as_app(database_url: str, config: dict[str, Any], project: str, step: str) -> str:
    """TrainingRun.create: the dialog's row, inserted with `.insert(payload).select().single()`."""
    cols = payloads.row(config, project_id=project, step_id=step)
    names = list(cols)
    values = [Jsonb(v) if n == "configuration" else v for n, v in cols.items()]
    placeholders = ", ".join(["%s"] * len(names))
    rows = as_app(
        database_url,
        f"insert into training_runs ({', '.join(names)}) values ({placeholders}) returning id",
        tuple(values),
    )
    return str(rows[0]["id"])


def fake(config: dict[str, Any], **knobs: Any) -> dict[str, Any]:
    """The app's configuration plus the fake trainer's knobs: no dataset or GPU needed."""
    return {**config, "trainer": "fake", **knobs}


def views_until(
    database_url: str, run_id: str, *final: str, timeout: float = 30
) -> list[tuple[str, AppView, dict[str, Any]]]:
    """Every distinct state of the row as the app would show it, until it reaches `final`."""
    seen: list[tuple[str, AppView, dict[str, Any]]] = []

    def sample() -> bool:
        row = fetch_run(database_url, run_id)
        view = app_view(row)
        if not seen or seen[-1][1] != view or seen[-1][0] != row["status"]:
            seen.append((row["status"], view, row))
        return row["status"] in final

    wait_for_sync(sample, timeout=timeout, interval=0.02, what=f"run {run_id} in {final}")
    return seen


def test_a_run_from_the_dialog_trains_and_the_app_shows_its_progress_and_results(
    app_database_url: str, agent: AgentProc
) -> None:
    project, step = project_and_step(app_database_url)
    config = payloads.edit_augmentation(
        payloads.apply_preset(payloads.dialog_config(), "edge_cpu"), "degrees", 5
    )
    config = fake({**config, "epochs": 5, "optimizationStrategy": "bayesian"}, fakeEpochSeconds=0.4)
    run_id = insert_as_app(app_database_url, config, project, step)

    seen = views_until(app_database_url, run_id, "completed", "failed")
    status, final, row = seen[-1]
    assert status == "completed", row["error_message"]
    running = [view for s, view, _ in seen if s == "running"]
    progress = [view.progress for view in running]
    # The bar moves epoch by epoch while training, instead of 0 % until the end.
    assert progress == sorted(progress)
    assert {20.0, 40.0, 60.0, 80.0} & set(progress), progress
    assert all(view.label == "Running" and view.is_training for view in running)
    assert (final.progress, final.label, final.has_results, final.epoch_display) == (100.0, "100%", True, 5)
    metrics = row["results"]["metrics"]
    assert metrics["epoch"] == 5 and metrics["time"] > 0
    assert row["run_name"] == "Inspect_bolt_v1" and str(row["project_id"]) == project
    assert row["updated_at"] >= row["completed_at"]

    notes = [r["message"] for r in agent.records() if r["message"].startswith("request note")]
    assert notes == [
        "request note: optimizationStrategy='bayesian' ignored: the run trains once with the values given"
    ]


def test_a_cancel_from_the_status_page_shows_canceling_then_canceled_with_the_progress_kept(
    app_database_url: str, agent: AgentProc
) -> None:
    project, step = project_and_step(app_database_url)
    run_id = insert_as_app(
        app_database_url, fake(payloads.dialog_config(), epochs=50, fakeEpochSeconds=0.3), project, step
    )
    wait_for_sync(
        lambda: (
            (fetch_run(app_database_url, run_id)["results"] or {}).get("metrics", {}).get("epoch", 0) >= 2
        ),
        what="two epochs",
    )
    # TrainingStatus.jsx's cancel button on a running run.
    as_app(
        app_database_url,
        "update training_runs set status = 'canceling', cancel_requested = true where id = %s",
        (run_id,),
    )
    seen = views_until(app_database_url, run_id, "canceled")
    _, final, row = seen[-1]
    assert final.label == "Canceled" and not final.is_training and not final.has_results
    assert 2 <= final.epoch_display < 50 and final.progress == pytest.approx(final.epoch_display * 2)
    assert row["error_message"] == "Canceled by user."
    assert all(view.label in ("Canceling", "Canceled") for _, view, _ in seen)


def test_a_failed_run_shows_failed_with_its_last_epoch(app_database_url: str, agent: AgentProc) -> None:
    project, step = project_and_step(app_database_url)
    config = fake(payloads.dialog_config(), epochs=10, fakeEpochSeconds=0.05, fakeCrashAtEpoch=4)
    run_id = insert_as_app(app_database_url, config, project, step)
    row = wait_status(app_database_url, run_id, "failed")
    view = app_view(row)
    assert (view.label, view.has_results, view.epoch_display, view.progress) == ("Failed", False, 3, 30.0)
    # The app shows error_message to users: a short reason and where the trainer's log is, no frames.
    message = row["error_message"]
    assert message.startswith("Training failed:") and "train.log" in message
    assert "Traceback" not in message and len(message) <= 2000


def running_child(database_url: str, agent: AgentProc, project: str, step: str) -> tuple[str, int]:
    # One long epoch: no epoch end, hence no progress write, while the test runs.
    config = fake(payloads.dialog_config(), epochs=2, fakeEpochSeconds=120, fakeBatches=1200)
    run_id = insert_as_app(database_url, config, project, step)
    wait_status(database_url, run_id, "running")
    pid = trainer_pid(agent, run_id)
    # The trainer's start is written at once; after it, nothing for 20 s.
    wait_for_sync(lambda: (fetch_run(database_url, run_id)["results"] or {}).get("progress"), what="progress")
    return run_id, pid


def stopped_within_bound(pid: int, changed_at: float) -> float:
    wait_for_sync(lambda: not pid_alive(pid), timeout=10, what="trainer gone")
    return time.monotonic() - changed_at


def assert_never_written_again(
    database_url: str, agent: AgentProc, run_id: str, before: dict[str, Any]
) -> None:
    """Once the agent has dropped the run, the row is as the other writer left it (updated_at too)."""
    # The agent logs this where it drops the run, instead of making a final write.
    agent.wait_logged(LOST)
    after = fetch_run(database_url, run_id)
    assert {k: after[k] for k in before} == before


@pytest.mark.parametrize("how", ["project deleted", "stopped", "run deleted", "claimed by the old script"])
def test_a_run_taken_away_by_anyone_else_stops_at_once_and_is_never_overwritten(
    app_database_url: str, events_only_agent: AgentProc, how: str
) -> None:
    agent = events_only_agent
    project, step = project_and_step(app_database_url)
    run_id, pid = running_child(app_database_url, agent, project, step)
    waiting = insert_as_app(app_database_url, fake(payloads.dialog_config(), epochs=1), project, step)

    changed_at = time.monotonic()
    if how == "project deleted":
        as_app(app_database_url, "delete from projects where id = %s", (project,))
    elif how == "stopped":
        as_app(app_database_url, "update training_runs set status = 'stopped' where id = %s", (run_id,))
    elif how == "run deleted":
        as_app(app_database_url, "delete from training_runs where id = %s", (run_id,))
    else:
        # The old script claims with an unconditional update, whatever the row's owner.
        as_app(
            app_database_url,
            "update training_runs set status = 'running', worker_id = 'old-script', started_at = now()"
            " where id = %s",
            (run_id,),
        )
    assert stopped_within_bound(pid, changed_at) < CANCEL_BOUND

    if how == "run deleted":
        agent.wait_logged(LOST)
        with psycopg.connect(app_database_url) as conn:
            assert conn.execute("select count(*) from training_runs where id = %s", (run_id,)).fetchone() == (
                0,
            )
    else:
        with psycopg.connect(app_database_url, row_factory=dict_row) as conn:
            row = conn.execute(
                "select status, worker_id, error_message, completed_at, results, updated_at"
                " from training_runs where id = %s",
                (run_id,),
            ).fetchone()
        assert row is not None
        expected = {
            "project deleted": ("canceled", "w1", "Project deleted."),
            "stopped": ("stopped", "w1", None),
            "claimed by the old script": ("running", "old-script", None),
        }[how]
        assert (row["status"], row["worker_id"], row["error_message"]) == expected
        assert_never_written_again(app_database_url, agent, run_id, dict(row))

    if how == "project deleted":
        # Its queued run went with it; the agent goes on serving others.
        with psycopg.connect(app_database_url) as conn:
            assert conn.execute(
                "select count(*) from training_runs where id = %s", (waiting,)
            ).fetchone() == (0,)
        other_project, other_step = project_and_step(app_database_url)
        waiting = insert_as_app(
            app_database_url, fake(payloads.dialog_config(), epochs=1), other_project, other_step
        )
    assert wait_status(app_database_url, waiting, "completed")["worker_id"] == "w1"
    assert json.dumps(agent.logged(LOST)[0]["run_id"]) == json.dumps(run_id)
