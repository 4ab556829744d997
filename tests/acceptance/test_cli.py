"""The smaller commands, as an operator types them."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

from tests.acceptance.agentproc import REPO, base_env


def cli(database_url: str, tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        cwd=REPO,
        env=base_env(database_url, tmp_path / "cli", **env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_migrate_print_is_the_schema_and_migrate_is_idempotent(database_url: str, tmp_path: Path) -> None:
    printed = cli(database_url, tmp_path, "migrate", "--print")
    assert printed.returncode == 0
    assert "create table if not exists public.training_runs" in printed.stdout
    assert "supabase_realtime" in printed.stdout
    for _ in range(2):
        assert cli(database_url, tmp_path, "migrate").returncode == 0


def test_bad_input_gets_a_clear_error(database_url: str, tmp_path: Path) -> None:
    bad_setting = cli(database_url, tmp_path, "list", POLL_INTERVAL="soon")
    assert bad_setting.returncode == 2 and "POLL_INTERVAL" in bad_setting.stderr
    bad_config = cli(database_url, tmp_path, "submit", "d.yaml", "--config", "{epochs: 3")
    assert bad_config.returncode == 2 and "--config" in bad_config.stderr
    unknown = cli(database_url, tmp_path, "cancel", str(uuid.uuid4()))
    assert unknown.returncode == 1 and "no active run" in unknown.stderr


def test_submit_then_cancel_before_any_agent_claims_it(database_url: str, tmp_path: Path) -> None:
    submitted = cli(database_url, tmp_path, "submit", "d.yaml", "--trainer", "fake")
    run_id = submitted.stdout.strip()
    assert submitted.returncode == 0 and len(run_id) == 36
    assert cli(database_url, tmp_path, "cancel", run_id).returncode == 0
    listed = cli(database_url, tmp_path, "list")
    assert run_id in listed.stdout
