"""A second signal leaves nothing behind: no trainer, no embedded Postgres, no run left `running`.

These agents run on the embedded default (no DATABASE_URL), as an operator starts `./dev run` on a
laptop, so that the test can see whether the agent's own Postgres outlives it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from agent.core.agent import FORCED_EXIT_MESSAGE
from tests.acceptance.agentproc import REPO, base_env
from tests.util import wait_for_sync

LONG = json.dumps({"fakeEpochSeconds": 0.2})


def embedded_env(data_dir: Path, **overrides: str) -> dict[str, str]:
    return base_env(None, data_dir, **overrides)


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=90
    )


def postgres_of(pgdata: Path) -> list[psutil.Process]:
    """Postgres server processes serving `pgdata`."""
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["name"] == "postgres" and str(pgdata) in cmdline:
            found.append(proc)
    return found


def records(log: Path) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rec = json.loads(line)["record"]
            out.append({"message": rec["message"], "level": rec["level"]["name"], **rec["extra"]})
    return out


def logged(log: Path, message: str) -> list[dict[str, Any]]:
    return [r for r in records(log) if r["message"] == message]


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A folder outside pytest's own: pytest keeps that tree private (0700) to its user, and as root
    the embedded Postgres runs as another user that must reach its data folder."""
    path = Path(tempfile.mkdtemp(prefix="saturnos-test-forced-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    # Whatever happened above, no server of this test may outlive it.
    for server in postgres_of((tmp_path / "agent" / "pgdata").resolve()):
        with contextlib.suppress(psutil.NoSuchProcess):
            server.kill()


def start_agent(
    started: list[subprocess.Popen[bytes]], env: dict[str, str], tmp_path: Path
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    log, out = tmp_path / "agent.log", tmp_path / "agent.out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "run"],
        cwd=REPO,
        env=env,
        stdout=out.open("wb"),
        stderr=log.open("wb"),
        start_new_session=True,
    )
    started.append(proc)
    wait_for_sync(
        lambda: logged(log, "event stream subscribed: catch-up poll") or proc.poll() is not None,
        timeout=60,
        what="agent ready",
    )
    assert proc.poll() is None, log.read_text()
    return proc, log, out


def submit_long(env: dict[str, str]) -> str:
    submitted = cli(env, "submit", "fake.yaml", "--trainer", "fake", "--epochs", "300", "--config", LONG)
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.strip().splitlines()[-1]


def trainer_pid(log: Path, run_id: str, proc: subprocess.Popen[bytes]) -> int:
    """The trainer's pid, once its first epoch has ended."""

    def training() -> list[dict[str, Any]]:
        assert proc.poll() is None, log.read_text()
        return [r for r in logged(log, "epoch done") if r.get("run_id") == run_id]

    wait_for_sync(training, timeout=60, what="training under way")
    return int(next(r for r in logged(log, "trainer started") if r["run_id"] == run_id)["pid"])


def shown(env: dict[str, str], run_id: str) -> dict[str, Any]:
    out = cli(env, "show", run_id, "--json")
    assert out.returncode == 0, out.stderr
    data: dict[str, Any] = json.loads(out.stdout)
    return data


def assert_nothing_left(pgdata: Path, trainer: int) -> None:
    wait_for_sync(lambda: not postgres_of(pgdata), timeout=10, what=f"no postgres for {pgdata}")
    wait_for_sync(lambda: not psutil.pid_exists(trainer) or _zombie(trainer), timeout=5, what="no trainer")


def _zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_two_sigints_in_wait_mode_fail_the_run_with_a_message_and_stop_postgres(
    tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    env = embedded_env(tmp_path / "agent", SHUTDOWN_MODE="wait")
    pgdata = (tmp_path / "agent" / "pgdata").resolve()
    proc, log, out = start_agent(started, env, tmp_path)
    run_id = submit_long(env)
    trainer = trainer_pid(log, run_id, proc)

    proc.send_signal(signal.SIGINT)
    wait_for_sync(lambda: logged(log, "shutdown requested"), what="first signal heard")
    asked = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=20) == 130
    assert time.monotonic() - asked < 10

    assert_nothing_left(pgdata, trainer)
    assert out.read_text() == "", "`run` prints nothing to stdout"
    settled = logged(log, "forced exit: run settled")
    assert [(r["run_id"], r["outcome"], r["landed"]) for r in settled] == [(run_id, "failed", True)]
    assert not logged(log, "event stream down: polling faster until it is back"), "startup false alarm"
    epochs = [r for r in logged(log, "epoch done") if r["run_id"] == run_id]
    assert epochs[0]["epoch"] == "1/300" and {"loss", "mAP50", "eta"} <= set(epochs[0])

    row = shown(env, run_id)  # starts the embedded Postgres again, and stops it on exit
    assert row["status"] == "failed"
    assert row["error_message"] == FORCED_EXIT_MESSAGE
    assert row["completed_at"] is not None
    wait_for_sync(lambda: not postgres_of(pgdata), timeout=60, what="the client's Postgres stopped too")


def test_two_sigints_in_release_mode_put_the_run_back_in_the_queue(
    tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    env = embedded_env(tmp_path / "agent", SHUTDOWN_MODE="release")
    pgdata = (tmp_path / "agent" / "pgdata").resolve()
    proc, log, _ = start_agent(started, env, tmp_path)
    run_id = submit_long(env)
    trainer = trainer_pid(log, run_id, proc)

    # Back to back: the second signal arrives while the release is still under way.
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=20) in (0, 130)

    assert_nothing_left(pgdata, trainer)
    row = shown(env, run_id)
    assert (row["status"], row["worker_id"], row["started_at"]) == ("queued", None, None)
    assert row["error_message"] is None


@pytest.mark.slow
def test_demo_on_two_ctrl_c_leaves_no_trainer_no_postgres_and_no_running_run(
    tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    env = embedded_env(tmp_path / "agent", LOG_JSON="0", SHUTDOWN_MODE="wait")
    pgdata = (tmp_path / "agent" / "pgdata").resolve()
    out, err = tmp_path / "demo.out", tmp_path / "demo.err"
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "demo", "--epochs", "200", "--imgsz", "64"],
        cwd=REPO,
        env=env,
        stdout=out.open("wb"),
        stderr=err.open("wb"),
        start_new_session=True,
    )
    started.append(proc)

    def submitted() -> str | None:
        assert proc.poll() is None, err.read_text()
        lines = [line for line in out.read_text().splitlines() if line.startswith("2/4 submitted run ")]
        return lines[0].split()[3] if lines else None

    run_id = wait_for_sync(submitted, timeout=120, what="demo submitted its run")

    def epoch_done() -> bool:
        assert proc.poll() is None, err.read_text()
        return "epoch 1/200" in out.read_text() or "epoch 2/200" in out.read_text()

    wait_for_sync(epoch_done, timeout=240, interval=0.5, what="the demo's first epoch")
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGINT)
    wait_for_sync(lambda: "press Ctrl-C again" in err.read_text(), what="first Ctrl-C acknowledged")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=20) == 130

    wait_for_sync(lambda: not postgres_of(pgdata), timeout=10, what=f"no postgres for {pgdata}")
    for child in children:
        wait_for_sync(lambda c=child: not c.is_running() or _zombie(c.pid), timeout=5, what="no trainer")
    row = shown(env, run_id)
    assert (row["status"], row["error_message"]) == ("failed", FORCED_EXIT_MESSAGE)
