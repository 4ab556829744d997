"""The whole run lifecycle through `python -m agent run` processes on a real Postgres."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.acceptance.agentproc import (
    REPO,
    AgentProc,
    base_env,
    claims_per_run,
    fetch_run,
    insert_run,
    install_claim_log,
    wait_status,
)
from tests.util import wait_for_sync

LONG = {"trainer": "fake", "epochs": 200, "fakeEpochSeconds": 0.2}


@pytest.fixture
def database_url(any_schema_database_url: str) -> str:
    """Each lifecycle test runs on the agent's own schema and on the web app's."""
    return any_schema_database_url


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[list[AgentProc]]:
    started: list[AgentProc] = []
    yield started
    for a in started:
        a.kill()


def start_agent(
    agents: list[AgentProc], database_url: str, tmp_path: Path, name: str = "w1", **env: str
) -> AgentProc:
    proc = AgentProc(
        base_env(database_url, tmp_path / name, WORKER_ID=name, **env), tmp_path / f"{name}.log"
    ).start()
    agents.append(proc)
    return proc.wait_ready()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes once reaped by its parent; check its state.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def trainer_pid(agent: AgentProc, run_id: str) -> int:
    recs = wait_for_sync(
        lambda: [r for r in agent.logged("trainer started") if r.get("run_id") == run_id],
        what="trainer started",
    )
    return int(recs[0]["pid"])


def test_submit_from_cli_is_picked_up_at_once_and_completes(
    database_url: str, tmp_path: Path, agents: list[AgentProc]
) -> None:
    agent = start_agent(agents, database_url, tmp_path)
    env = base_env(database_url, tmp_path / "cli")
    started = time.monotonic()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent",
            "submit",
            "fake.yaml",
            "--trainer",
            "fake",
            "--epochs",
            "3",
            "--config",
            json.dumps({"fakeEpochSeconds": 0.1}),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    run_id = out.stdout.strip().splitlines()[-1]
    wait_status(database_url, run_id, "running", "completed", timeout=5)
    picked_up = time.monotonic() - started
    row = wait_status(database_url, run_id, "completed", timeout=30)

    assert picked_up < 5, "pickup took as long as a poll: events are not working"
    assert row["worker_id"] == "w1"
    assert row["attempt"] == 1
    assert row["started_at"] is not None and row["completed_at"] >= row["started_at"]
    assert row["error_message"] is None
    assert row["trained_model_url"].startswith("file://") and row["trained_model_url"].endswith("best.pt")
    results = row["results"]
    assert results["progress"]["percent"] == 100.0 and results["progress"]["epoch"] == 3
    assert results["progress"]["eta"] == "00:00:00"
    assert {"mAP", "precision", "recall", "metrics", "artifacts", "run_dir"} <= set(results)
    names = {a["name"] for a in results["artifacts"]}
    assert {"best.pt", "last.pt", "results.csv", "args.yaml"} <= names
    for artifact in results["artifacts"]:
        assert artifact["path"].startswith(f"training_runs/{run_id}/")
        assert Path(artifact["url"].removeprefix("file://")).is_file()

    listed = subprocess.run(
        [sys.executable, "-m", "agent", "list"], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    assert run_id in listed.stdout and "completed" in listed.stdout
    watched = subprocess.run(
        [sys.executable, "-m", "agent", "watch", run_id],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert watched.returncode == 0 and "100.0%" in watched.stdout
    assert agent.proc.poll() is None


def test_bad_rows_fail_with_a_message_naming_the_problem_and_the_agent_goes_on(
    database_url: str, tmp_path: Path, agents: list[AgentProc]
) -> None:
    start_agent(agents, database_url, tmp_path)
    not_json = insert_run(database_url, configuration="{epochs: 3")
    negative = insert_run(database_url, configuration={"trainer": "fake", "epochs": -3})
    no_yaml = insert_run(database_url, data_yaml=None)
    good = insert_run(database_url)

    assert "configuration" in wait_status(database_url, not_json, "failed")["error_message"]
    assert "not valid JSON" in fetch_run(database_url, not_json)["error_message"]
    msg = wait_status(database_url, negative, "failed")["error_message"]
    assert "epochs" in msg and "-3" in msg
    assert "data_yaml" in wait_status(database_url, no_yaml, "failed")["error_message"]
    assert wait_status(database_url, good, "completed")["error_message"] is None


def test_a_crashing_trainer_fails_the_run_with_its_last_error_lines(
    database_url: str, tmp_path: Path, agents: list[AgentProc]
) -> None:
    start_agent(agents, database_url, tmp_path)
    run_id = insert_run(
        database_url, {"trainer": "fake", "epochs": 5, "fakeCrashAtEpoch": 2, "fakeEpochSeconds": 0.05}
    )
    row = wait_status(database_url, run_id, "failed")
    assert "code 3" in row["error_message"]
    assert row["completed_at"] is not None


def test_cancel_of_a_running_run_stops_the_child_and_writes_canceled(
    database_url: str, tmp_path: Path, agents: list[AgentProc]
) -> None:
    agent = start_agent(agents, database_url, tmp_path)
    run_id = insert_run(database_url, LONG)
    wait_status(database_url, run_id, "running")
    pid = trainer_pid(agent, run_id)
    wait_for_sync(lambda: (fetch_run(database_url, run_id)["results"] or {}).get("progress"), what="progress")

    with psycopg.connect(database_url) as conn:
        conn.execute("update training_runs set cancel_requested = true where id = %s", (run_id,))
    asked = time.monotonic()
    wait_for_sync(lambda: not pid_alive(pid), timeout=5, what="child gone")
    stopped_in = time.monotonic() - asked
    row = wait_status(database_url, run_id, "canceled", timeout=5)

    assert stopped_in < 2.0
    assert row["error_message"] == "Canceled by user."
    assert row["canceled_at"] is not None and row["completed_at"] is not None
    assert row["worker_id"] == "w1"


def test_cancel_of_an_unclaimed_run_marks_it_canceled(
    database_url: str, tmp_path: Path, agents: list[AgentProc]
) -> None:
    start_agent(agents, database_url, tmp_path)
    busy = insert_run(database_url, LONG)
    wait_status(database_url, busy, "running")
    waiting = insert_run(database_url)
    with psycopg.connect(database_url) as conn:
        conn.execute("update training_runs set cancel_requested = true where id = %s", (waiting,))
    row = wait_status(database_url, waiting, "canceled", timeout=10)
    assert row["worker_id"] is None and row["started_at"] is None
    assert row["error_message"] == "Canceled by user." and row["canceled_at"] is not None
    assert fetch_run(database_url, busy)["status"] == "running"


def test_sigterm_in_wait_mode_finishes_the_run_then_exits(
    database_url: str, tmp_path: Path, agents: list[AgentProc]
) -> None:
    agent = start_agent(agents, database_url, tmp_path, SHUTDOWN_MODE="wait")
    run_id = insert_run(database_url, {"trainer": "fake", "epochs": 6, "fakeEpochSeconds": 0.3})
    wait_status(database_url, run_id, "running")
    agent.signal(signal.SIGTERM)
    assert agent.wait_exit(timeout=30) == 0
    assert fetch_run(database_url, run_id)["status"] == "completed"
    with psycopg.connect(database_url) as conn:
        status = conn.execute("select status from trainer_workers where worker_id = 'w1'").fetchone()
    assert status == ("offline",)


def test_sigterm_in_release_mode_puts_the_run_back_and_stops_the_child(
    database_url: str, tmp_path: Path, agents: list[AgentProc]
) -> None:
    agent = start_agent(agents, database_url, tmp_path, SHUTDOWN_MODE="release")
    run_id = insert_run(database_url, LONG)
    wait_status(database_url, run_id, "running")
    pid = trainer_pid(agent, run_id)
    agent.signal(signal.SIGTERM)
    assert agent.wait_exit(timeout=20) == 0
    assert not pid_alive(pid)
    row = fetch_run(database_url, run_id)
    assert (row["status"], row["worker_id"], row["started_at"]) == ("queued", None, None)

    second = start_agent(agents, database_url, tmp_path, name="w2")
    row = wait_status(database_url, run_id, "running")
    assert (row["worker_id"], row["attempt"]) == ("w2", 2)
    second.signal(signal.SIGTERM)


def test_a_second_sigint_exits_at_once_and_leaves_no_child(
    database_url: str, tmp_path: Path, agents: list[AgentProc]
) -> None:
    agent = start_agent(agents, database_url, tmp_path, SHUTDOWN_MODE="wait")
    run_id = insert_run(database_url, LONG)
    wait_status(database_url, run_id, "running")
    pid = trainer_pid(agent, run_id)
    agent.signal(signal.SIGINT)
    agent.wait_logged("shutdown requested")
    started = time.monotonic()
    agent.signal(signal.SIGINT)
    assert agent.wait_exit(timeout=10) != 0
    assert time.monotonic() - started < 5
    wait_for_sync(lambda: not pid_alive(pid), timeout=5, what="child gone")


def test_with_events_off_the_poll_still_picks_every_run_up(
    database_url: str, tmp_path: Path, agents: list[AgentProc]
) -> None:
    with psycopg.connect(database_url) as conn:
        conn.execute("alter table training_runs disable trigger saturnos_training_runs_notify_insert")
        conn.execute("alter table training_runs disable trigger saturnos_training_runs_notify_update")
    start_agent(agents, database_url, tmp_path, POLL_INTERVAL="1")
    ids = [
        insert_run(database_url, {"trainer": "fake", "epochs": 1, "fakeEpochSeconds": 0.01}) for _ in range(4)
    ]
    for run_id in ids:
        wait_status(database_url, run_id, "completed", timeout=20)


def test_listen_connection_killed_while_runs_arrive_loses_nothing(
    database_url: str, tmp_path: Path, agents: list[AgentProc]
) -> None:
    agent = start_agent(agents, database_url, tmp_path)
    quick = {"trainer": "fake", "epochs": 1, "fakeEpochSeconds": 0.01}
    ids = []
    kills = 0
    for i in range(12):
        ids.append(insert_run(database_url, quick))
        if i in (3, 8):
            # Runs keep arriving while the listener is down; the second kill waits for the first
            # reconnect, so that it has a connection to kill.
            agent.wait_logged("event stream subscribed: catch-up poll", count=kills + 1)
            kills += 1
            with psycopg.connect(database_url) as conn:
                killed = conn.execute(
                    "select pg_terminate_backend(pid) from pg_stat_activity "
                    "where datname = current_database() and application_name = 'saturnos-agent listen'"
                ).fetchall()
            assert killed, "no LISTEN connection found"
    for run_id in ids:
        wait_status(database_url, run_id, "completed", timeout=30)
    agent.wait_logged("event stream subscribed: catch-up poll", count=3)


def test_a_run_of_a_dead_worker_is_rescued_and_finished(
    database_url: str, tmp_path: Path, agents: list[AgentProc]
) -> None:
    run_id = insert_run(database_url)
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "update training_runs set status='running', worker_id='dead',"
            " started_at=now() - interval '1 hour',"
            " heartbeat_at = now() - interval '1 hour' where id = %s",
            (run_id,),
        )
    start_agent(agents, database_url, tmp_path, STALE_AFTER="4", POLL_INTERVAL="1")
    row = wait_status(database_url, run_id, "completed", timeout=30)
    assert row["worker_id"] == "w1" and row["attempt"] == 2


@pytest.mark.slow
def test_claim_race_eight_agents_two_hundred_runs_each_run_once(
    database_url: str, tmp_path: Path, agents: list[AgentProc]
) -> None:
    install_claim_log(database_url)
    procs = [
        AgentProc(
            base_env(database_url, tmp_path / f"a{i}", WORKER_ID=f"a{i}", LOG_LEVEL="INFO"),
            tmp_path / f"a{i}.log",
        ).start()
        for i in range(8)
    ]
    agents.extend(procs)
    for p in procs:
        p.wait_ready(timeout=60)
    quick = json.dumps({"trainer": "fake", "epochs": 1, "fakeEpochSeconds": 0.0, "fakeBatches": 1})
    with psycopg.connect(database_url) as conn:
        for _ in range(200):
            conn.execute(
                "insert into training_runs (run_name, data_yaml, configuration)"
                " values ('race', 'fake.yaml', %s)",
                (quick,),
            )

    def finished() -> bool:
        with psycopg.connect(database_url) as conn:
            row = conn.execute("select count(*) from training_runs where status = 'completed'").fetchone()
        return row is not None and row[0] == 200

    wait_for_sync(finished, timeout=240, interval=0.5, what="200 runs completed")
    with psycopg.connect(database_url) as conn:
        attempts = conn.execute("select max(attempt), min(attempt) from training_runs").fetchone()
        workers = conn.execute("select count(distinct worker_id) from training_runs").fetchone()
    claims = claims_per_run(database_url)
    assert len(claims) == 200
    assert all(n == 1 for _, n in claims), "a run was claimed twice"
    assert attempts == (1, 1)
    assert workers is not None and workers[0] >= 2, "the race had a single winner: agents did not compete"
