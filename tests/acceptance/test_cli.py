"""The smaller commands, as an operator types them."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cli import _parser, build_new_run
from agent.domain.run import NewRun
from tests.acceptance.agentproc import REPO, AgentProc, base_env


def cli(
    database_url: str, tmp_path: Path, *args: str, cwd: Path = REPO, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        cwd=cwd,
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


def test_submit_refuses_what_the_agent_would_refuse_and_inserts_nothing(
    database_url: str, tmp_path: Path
) -> None:
    for args, message in (
        (("--epochs", "-1"), "Invalid training request: epochs=-1: must be between 1 and 100000"),
        (("--model", "YOLOv9x"), "Invalid training request: base_model='YOLOv9x': unknown model"),
        (("--config", '{"optimizer": "Fast"}'), "Invalid training request: optimizer='Fast'"),
    ):
        refused = cli(database_url, tmp_path, "submit", "d.yaml", *args)
        assert refused.returncode == 2, refused
        assert message in refused.stderr and refused.stdout == ""
    listed = cli(database_url, tmp_path, "list")
    assert listed.stdout.strip().count("\n") == 0, "only the header: nothing was inserted"

    forced = cli(database_url, tmp_path, "submit", "d.yaml", "--epochs", "-1", "--no-validate")
    assert forced.returncode == 0 and len(forced.stdout.strip()) == 36


def test_submit_sends_a_path_that_exists_here_as_an_absolute_path(database_url: str, tmp_path: Path) -> None:
    here = tmp_path / "work"
    (here / "my-dataset").mkdir(parents=True)
    (here / "my-dataset" / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\n")
    submitted = cli(database_url, tmp_path, "submit", "./my-dataset/data.yaml", "--trainer", "fake", cwd=here)
    assert submitted.returncode == 0, submitted.stderr
    shown = json.loads(cli(database_url, tmp_path, "show", submitted.stdout.strip(), "--json").stdout)
    assert shown["data_yaml"] == str((here / "my-dataset" / "data.yaml").resolve())

    elsewhere = cli(database_url, tmp_path, "submit", "other/data.yaml", cwd=here)
    assert elsewhere.returncode == 0
    assert "not a file here; the agent looks for it under its DATASET_ROOT" in elsewhere.stderr
    shown = json.loads(cli(database_url, tmp_path, "show", elsewhere.stdout.strip(), "--json").stdout)
    assert shown["data_yaml"] == "other/data.yaml"


def test_submit_passes_name_project_and_step_to_the_row() -> None:
    args = _parser().parse_args(
        ["submit", "d.yaml", "--name", "cars v2", "--project", "p-1", "--step", "s-9", "--epochs", "3"]
    )
    run = build_new_run(args)
    assert run == NewRun("d.yaml", None, {"epochs": 3}, run_name="cars v2", project_id="p-1", step_id="s-9")


@pytest.fixture
def agent(database_url: str, tmp_path: Path) -> Iterator[AgentProc]:
    proc = AgentProc(base_env(database_url, tmp_path / "agent", WORKER_ID="w1"), tmp_path / "agent.log")
    proc.start().wait_ready()
    yield proc
    proc.kill()


def test_watch_ends_by_showing_the_run_and_list_shows_metric_and_error(
    database_url: str, tmp_path: Path, agent: AgentProc
) -> None:
    fake = ("--trainer", "fake", "--config", json.dumps({"fakeEpochSeconds": 0.05}))
    done = cli(database_url, tmp_path, "submit", "fake.yaml", "--epochs", "2", *fake, "--watch")
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", "a client logs nothing unless -v"
    run_id = done.stdout.splitlines()[0]
    shown = done.stdout.split("status     completed", 1)[1]
    for label in (
        "worker     w1 (attempt 1)",
        "took",
        "progress   epoch 2/2, 100.0%",
        "mAP50-95   0.",
        "model ",
    ):
        assert label in shown, shown
    assert shown.count("artifact   file://") >= 4

    failed = cli(
        database_url, tmp_path, "submit", "fake.yaml", "--epochs", "0", "--no-validate", *fake, "--watch"
    )
    assert failed.returncode == 1
    assert "error      Invalid training request: epochs=0" in failed.stdout

    data = json.loads(cli(database_url, tmp_path, "show", run_id, "--json").stdout)
    assert data["status"] == "completed" and data["trained_model_url"].endswith("best.pt")
    assert set(data["summary"]["metrics"]) == {"mAP50-95", "mAP50", "precision", "recall"}
    assert all(isinstance(v, float) for v in data["summary"]["metrics"].values())

    listed = cli(database_url, tmp_path, "list").stdout.splitlines()
    assert "mAP50-95" in listed[0] and "error" in listed[0]
    failed_line = next(line for line in listed if "failed" in line)
    assert failed_line.endswith("Invalid training request: epochs=0: must be between 1 and 100000")
    completed_line = next(line for line in listed if run_id in line)
    assert f"{data['summary']['metrics']['mAP50-95']:.4f}" in completed_line

    missing = cli(database_url, tmp_path, "show", str(uuid.uuid4()))
    assert missing.returncode == 1 and "not found" in missing.stderr


@pytest.mark.parametrize("command", ["run", "submit", "cancel", "list", "show", "watch", "demo", "migrate"])
def test_every_command_help_shows_exit_codes_and_defaults(command: str, tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "agent", command, "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    text = " ".join(out.stdout.split())  # argparse wraps to the terminal's width
    assert "exit codes:" in text
    if command == "submit":
        assert "(default: YOLOv8s)" in text and "(default: 100)" in text
    if command == "run":
        assert "SHUTDOWN_MODE wait" in text and "STALE_AFTER 120.0" in text
    if command == "demo":
        assert "(default: 40)" in text and "--dataset-only" in text
