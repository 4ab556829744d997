"""The agent as an operator runs it: `python -m agent run` in its own OS process."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from tests.util import wait_for_sync

REPO = Path(__file__).resolve().parents[2]


def base_env(database_url: str | None, data_dir: Path, **overrides: str) -> dict[str, str]:
    """The agent's environment on `database_url`, or on its embedded Postgres when None."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SUPABASE_", "DATABASE_URL"))}
    if database_url is not None:
        env["DATABASE_URL"] = database_url
    env.update(
        DATA_DIR=str(data_dir),
        OFFLINE="1",
        LOG_JSON="1",
        LOG_LEVEL="DEBUG",
        POLL_INTERVAL="30",
        HEARTBEAT_INTERVAL="1",
        PROGRESS_INTERVAL="0.5",
        STALE_AFTER="10",
        STOP_GRACE="2",
        KILL_GRACE="2",
        PYTHONPATH=str(REPO),
        ALLOW_FAKE_TRAINER="1",
    )
    env.update(overrides)
    return env


@dataclass
class AgentProc:
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] = field(init=False)

    def start(self) -> AgentProc:
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "run"],
            cwd=REPO,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(data, dict) and "record" in data:
                rec = data["record"]
                out.append({"message": rec["message"], "level": rec["level"]["name"], **rec["extra"]})
            elif isinstance(data, dict):
                out.append(data)
        return out

    def logged(self, message: str) -> list[dict[str, Any]]:
        return [r for r in self.records() if r.get("message") == message]

    def wait_logged(self, message: str, timeout: float = 20.0, count: int = 1) -> list[dict[str, Any]]:
        return wait_for_sync(
            lambda: (found := self.logged(message)) and len(found) >= count and found,
            timeout=timeout,
            what=f"log {message!r} x{count} in {self.log_path}",
        )

    def wait_ready(self, timeout: float = 30.0) -> AgentProc:
        self.wait_logged("event stream subscribed: catch-up poll", timeout=timeout)
        return self

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._log.close()


def fetch_run(database_url: str, run_id: str) -> dict[str, Any]:
    with psycopg.connect(database_url) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        row = cur.execute("select * from training_runs where id = %s", (run_id,)).fetchone()
    assert row is not None
    return dict(row)


def insert_run(
    database_url: str, configuration: Any = None, data_yaml: str | None = "fake.yaml", **cols: Any
) -> str:
    config = (
        {"trainer": "fake", "epochs": 2, "fakeEpochSeconds": 0.05} if configuration is None else configuration
    )
    payload = json.dumps(config)
    cols.setdefault("run_name", "test run")  # required by the web app's schema
    with psycopg.connect(database_url) as conn:
        names = ["data_yaml", "configuration", *cols]
        values = [data_yaml, payload, *cols.values()]
        placeholders = ", ".join(["%s"] * len(values))
        row = conn.execute(
            f"insert into training_runs ({', '.join(names)}) values ({placeholders}) returning id",
            values,
        ).fetchone()
    assert row is not None
    return str(row[0])


def wait_status(database_url: str, run_id: str, *statuses: str, timeout: float = 30.0) -> dict[str, Any]:
    return wait_for_sync(
        lambda: (row := fetch_run(database_url, run_id))["status"] in statuses and row,
        timeout=timeout,
        what=f"run {run_id} in {statuses}",
    )


def now() -> float:
    return time.monotonic()


CLAIM_LOG = """
create table claim_log (run_id uuid, worker_id text, attempt int, at timestamptz default now());
create function log_claim() returns trigger language plpgsql security definer as $$
begin
  insert into claim_log (run_id, worker_id, attempt) values (new.id, new.worker_id, new.attempt);
  return null;
end $$;
create trigger log_claim after update on training_runs for each row
  when (old.worker_id is null and new.worker_id is not null) execute function log_claim();
"""


def install_claim_log(database_url: str) -> None:
    """Record every claim (worker_id going from null to a value) in a test table."""
    with psycopg.connect(database_url) as conn:
        conn.execute(CLAIM_LOG)


def claims_per_run(database_url: str) -> list[tuple[Any, int]]:
    with psycopg.connect(database_url) as conn:
        return [
            (r[0], int(r[1])) for r in conn.execute("select run_id, count(*) from claim_log group by run_id")
        ]
