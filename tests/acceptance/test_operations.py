"""Operations through `python -m agent run`: device slots pinned in real children, metrics and health."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.acceptance.agentproc import AgentProc, base_env, fetch_run, insert_run, wait_status
from tests.util import wait_for_sync

LONG = {"trainer": "fake", "epochs": 200, "fakeEpochSeconds": 0.2}


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[list[AgentProc]]:
    started: list[AgentProc] = []
    yield started
    for a in started:
        a.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = get(port, "/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def args_of(data_dir: Path, run_id: str) -> dict[str, object]:
    """The run's args.yaml as uploaded (the workspace is gone once the run completed)."""
    text = (data_dir / "artifacts" / "training_runs" / run_id / "args.yaml").read_text()
    return {k: json.loads(v) for k, v in (line.split(": ", 1) for line in text.splitlines())}


def test_fake_devices_metrics_and_health_of_a_real_agent(
    database_url: str, tmp_path: Path, agents: list[AgentProc]
) -> None:
    port = free_port()
    data_dir = tmp_path / "w1"
    env = base_env(database_url, data_dir, WORKER_ID="w1", DEVICES="0,1,2,3", METRICS_PORT=str(port))
    agent = AgentProc(env, tmp_path / "w1.log").start()
    agents.append(agent)
    agent.wait_ready()

    assert get(port, "/healthz") == (200, "ok\n")
    wait_for_sync(lambda: get(port, "/readyz")[0] == 200, what="ready")
    before = scrape(port)
    assert value(before, "saturnos_slots_total") == 4
    assert value(before, "saturnos_event_stream_up") == 1

    quick = {"trainer": "fake", "epochs": 2, "fakeEpochSeconds": 0.05}
    pair = insert_run(database_url, {**quick, "device": "0,1"})
    single = insert_run(database_url, {**quick, "device": 0})
    for run_id in (pair, single):
        wait_status(database_url, run_id, "completed")
    held = {run_id: str(args_of(data_dir, run_id)["visible_devices"]).split(",") for run_id in (pair, single)}
    assert len(held[pair]) == 2 and len(held[single]) == 1
    assert set(held[pair]) | set(held[single]) <= {"0", "1", "2", "3"}
    assert args_of(data_dir, pair)["device"] == "0,1" and args_of(data_dir, single)["device"] == "0"

    long = insert_run(database_url, {**LONG, "device": [0, 1, 2]})
    wait_for_sync(lambda: value(scrape(port), "saturnos_slots_busy") == 3, what="three slots busy")
    with psycopg.connect(database_url) as conn:
        worker = conn.execute(
            "select slots, free_slots, device_type, gpu_name from trainer_workers where worker_id = 'w1'"
        ).fetchone()
        conn.execute("update training_runs set cancel_requested = true where id = %s", (long,))
    assert worker == (4, 1, "gpu", "GPU 0, GPU 1, GPU 2, GPU 3")
    wait_status(database_url, long, "canceled")

    # The slots are given back once the run's final write landed, a moment after the row changed.
    after = wait_for_sync(
        lambda: (
            (s := scrape(port))
            and value(s, "saturnos_cancel_latency_seconds_count") == 1
            and value(s, "saturnos_slots_busy") == 0
            and s
        ),
        what="cancel counted and slots free",
    )
    assert value(after, "saturnos_runs_claimed_total") == 3
    assert value(after, "saturnos_runs_finished_total", outcome="completed") == 2
    assert value(after, "saturnos_runs_finished_total", outcome="canceled") == 1
    assert value(after, "saturnos_pickup_latency_seconds_count") == 3
    assert value(after, "saturnos_cancel_latency_seconds_sum") < 5
    assert value(after, "saturnos_catchup_polls_total") >= 1
    assert value(after, "saturnos_slots_busy") == 0
    assert get(port, "/nope")[0] == 404
    assert fetch_run(database_url, long)["error_message"] == "Canceled by user."


def test_readyz_fails_while_the_database_is_unreachable(
    database_url: str, tmp_path: Path, agents: list[AgentProc]
) -> None:
    port = free_port()
    env = base_env(
        database_url, tmp_path / "w1", WORKER_ID="w1", METRICS_PORT=str(port), HEARTBEAT_INTERVAL="0.5"
    )
    agent = AgentProc(env, tmp_path / "w1.log").start()
    agents.append(agent)
    agent.wait_ready()
    wait_for_sync(lambda: get(port, "/readyz")[0] == 200, what="ready")

    dbname = psycopg.conninfo.conninfo_to_dict(database_url)["dbname"]
    admin = psycopg.conninfo.make_conninfo(database_url, dbname="postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        # Every connection to the agent's database is cut, and no new one is let in.
        conn.execute(f'alter database "{dbname}" allow_connections false')
        conn.execute("select pg_terminate_backend(pid) from pg_stat_activity where datname = %s", (dbname,))
        try:
            _, body = wait_for_sync(
                lambda: (r := get(port, "/readyz"))[0] == 503 and r, timeout=30, what="not ready"
            )
            assert "database unreachable" in body
            assert get(port, "/healthz")[0] == 200, "the loop is alive: no restart needed"
            scraped = scrape(port)
            assert value(scraped, "saturnos_database_up") == 0
        finally:
            conn.execute(f'alter database "{dbname}" allow_connections true')
    wait_for_sync(lambda: get(port, "/readyz")[0] == 200, timeout=30, what="ready again")
