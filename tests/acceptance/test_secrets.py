"""No secret in any log line, row, worker row or printed line: a full run, a failed run, misconfigurations.

The database password, the service-role key and signed-URL tokens are looked for in everything
the agent and the CLI wrote. The test server trusts local connections, so a password in the URL
is carried everywhere the URL goes without being needed.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest

from tests.acceptance.agentproc import REPO, AgentProc, base_env, insert_run, wait_status
from tests.acceptance.test_supabase_agent import Project, agent_env, project  # noqa: F401

PASSWORD = "Pa55-w0rd-never-logged"
FULL = {"trainer": "fake", "epochs": 2, "fakeEpochSeconds": 0.05}
CRASH = {"trainer": "fake", "epochs": 3, "fakeCrashAtEpoch": 2, "fakeEpochSeconds": 0.05}


def with_password(database_url: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(database_url)
    host = quote(str(info.get("host", "localhost")), safe="")
    user, port = info.get("user", "postgres"), info.get("port", 5432)
    return f"postgresql://{user}:{PASSWORD}@{host}:{port}/{info['dbname']}"


def everything_written(database_url: str) -> str:
    """Every row and worker row, with the artifact URLs (signed on purpose) left out."""
    with psycopg.connect(database_url) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        runs = cur.execute("select * from training_runs").fetchall()
        workers = cur.execute("select * from trainer_workers").fetchall()
    for run in runs:
        run.pop("trained_model_url", None)
        for artifact in (run.get("results") or {}).get("artifacts", []):
            artifact.pop("url", None)
    return json.dumps([runs, workers], default=str)


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )


def assert_clean(text: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in text
    assert "Traceback (most recent call last)" not in text


def test_postgres_password_never_written(database_url: str, tmp_path: Path) -> None:
    url = with_password(database_url)
    env = base_env(url, tmp_path / "agent", WORKER_ID="w-secret")
    agent = AgentProc(env, tmp_path / "agent.log").start()
    try:
        agent.wait_ready(60)
        full = insert_run(database_url, FULL)
        crash = insert_run(database_url, CRASH)
        assert wait_status(database_url, full, "completed", "failed")["status"] == "completed"
        failed = wait_status(database_url, crash, "failed", "completed")
        assert failed["status"] == "failed" and "train.log" in failed["error_message"]
        assert "Traceback" not in failed["error_message"] and len(failed["error_message"]) < 400
        train_log = [a for a in failed["results"]["artifacts"] if a["name"] == "train.log"]
        assert train_log and Path(train_log[0]["url"].removeprefix("file://")).read_text().strip()
    finally:
        agent.kill()

    # The same agent with the fake trainer left at its default, which is off for this backend.
    off = AgentProc({**env, "ALLOW_FAKE_TRAINER": "", "WORKER_ID": "w-off"}, tmp_path / "off.log").start()
    try:
        off.wait_ready(60)
        refused = wait_status(database_url, insert_run(database_url, FULL), "failed", "completed")
        assert refused["status"] == "failed" and "ALLOW_FAKE_TRAINER" in refused["error_message"]
    finally:
        off.kill()

    migrated = cli("migrate", env=env)
    assert migrated.returncode == 0, migrated.stderr
    assert re.search(r"migrated postgresql://\w+:\*\*\*@", migrated.stdout), migrated.stdout
    outputs = [migrated.stdout + migrated.stderr]
    for bad in (
        url.replace("postgresql://", "postgresql//"),  # not a URL: read as key=value and echoed
        f"postgresql://user:{PASSWORD}@127.0.0.1:notaport/db",
        f"postgresql://user:{PASSWORD}@127.0.0.1:1/db",  # nothing listens there
    ):
        for command in ("migrate", "doctor"):
            done = cli(command, env={**env, "DATABASE_URL": bad})
            assert done.returncode != 0, (command, bad, done.stdout)
            assert done.stderr.strip() or done.stdout.strip()
            outputs.append(done.stdout + done.stderr)
    for text in (*outputs, (tmp_path / "agent.log").read_text(), (tmp_path / "off.log").read_text()):
        assert_clean(text, PASSWORD)
    assert_clean(everything_written(database_url), PASSWORD)


def test_service_role_key_and_signed_tokens_never_written(
    project: Project,  # noqa: F811
    database_url: str,
    tmp_path: Path,
) -> None:
    env = agent_env(project, tmp_path / "agent", "w-signed", ARTIFACT_URL_MODE="signed", LOG_LEVEL="DEBUG")
    agent = AgentProc(env, tmp_path / "agent.log").start()
    try:
        agent.wait_ready(60)
        full = insert_run(database_url, FULL)
        crash = insert_run(database_url, CRASH)
        done = wait_status(database_url, full, "completed", "failed", timeout=60)
        failed = wait_status(database_url, crash, "failed", "completed", timeout=60)
    finally:
        agent.kill()
    assert done["status"] == "completed" and failed["status"] == "failed"
    urls: list[Any] = [done["trained_model_url"]]
    urls += [a["url"] for row in (done, failed) for a in (row["results"] or {}).get("artifacts", [])]
    tokens = {t for u in urls for t in re.findall(r"token=([^&]+)", u)}
    assert tokens, urls

    bad_url = cli("doctor", env={**env, "SUPABASE_URL": f"htps//user:{PASSWORD}@nowhere"})
    assert bad_url.returncode != 0 and "SUPABASE_URL" in bad_url.stderr + bad_url.stdout
    for text in (
        (tmp_path / "agent.log").read_text(),
        everything_written(database_url),
        bad_url.stdout + bad_url.stderr,
    ):
        assert_clean(text, project.service_role_key, PASSWORD, *tokens)


@pytest.mark.parametrize("setting", ["SUPABASE_SERVICE_ROLE_KEY", "AGENT_SECRET"])
def test_key_settings_are_masked_in_the_settings_error(setting: str, tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "DATA_DIR": str(tmp_path)}
    env.update(SUPABASE_URL="https://x.supabase.co", SUPABASE_SERVICE_ROLE_KEY="service-role-" + PASSWORD)
    env[setting] = "short" if setting == "AGENT_SECRET" else env[setting]
    env["POLL_INTERVAL"] = "-1"  # any invalid setting: the message must not carry the key
    done = cli("doctor", env=env)
    assert done.returncode != 0 and "POLL_INTERVAL" in done.stdout + done.stderr
    assert_clean(done.stdout + done.stderr, PASSWORD)
