"""Real Ultralytics training through `python -m agent run`, on synthetic datasets, on the CPU."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from agent.datasets.synthetic import make_dataset
from tests.acceptance.agentproc import AgentProc, base_env, fetch_run, wait_status
from tests.acceptance.test_lifecycle import pid_alive, trainer_pid
from tests.util import wait_for_sync

pytestmark = pytest.mark.slow

SMALL = {
    "epochs": 2,
    "imgSize": 64,
    "batchSize": 8,
    "pretrained": False,
    "device": "cpu",
    "workers": 0,
    "plots": False,
}


@pytest.fixture
def agent(database_url: str, tmp_path: Path) -> Iterator[AgentProc]:
    audit = tmp_path / "audit.log"
    proc = AgentProc(
        base_env(
            database_url,
            tmp_path / "agent",
            WORKER_ID="gpu-1",
            SATURNOS_AUDIT_SOCKETS=str(audit),
            WEIGHTS_DIR=str(tmp_path / "weights"),
            # Local datasets on the postgres backend must lie under a dataset root.
            DATASET_ROOT=str(tmp_path),
        ),
        tmp_path / "agent.log",
    ).start()
    (tmp_path / "weights").mkdir()
    try:
        yield proc.wait_ready()
    finally:
        proc.kill()


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Bytes and mtime of every file: the user's dataset must come out untouched."""
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def submit(database_url: str, data_yaml: Path | str, base_model: str = "YOLOv8n", **config: Any) -> str:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "insert into training_runs (data_yaml, base_model, configuration)"
            " values (%s, %s, %s) returning id",
            (str(data_yaml), base_model, json.dumps({**SMALL, **config})),
        ).fetchone()
    assert row is not None
    return str(row[0])


@pytest.mark.parametrize("task", ["detect", "segment"])
def test_a_real_training_completes_with_the_old_row_contract(
    task: str, database_url: str, tmp_path: Path, agent: AgentProc
) -> None:
    data = make_dataset(tmp_path / "user-data", task, train=16, val=4, imgsz=64)  # type: ignore[arg-type]
    before = snapshot(data.parent)
    # The segment request names no task: it is inferred from the polygon labels, as the old script did.
    # Plots on for segment: offline, they must not try to download a font.
    run_id = submit(database_url, data, **({"task": "detect"} if task == "detect" else {"plots": True}))
    row = wait_status(database_url, run_id, "completed", "failed", timeout=240)

    assert row["status"] == "completed", row["error_message"]
    assert row["error_message"] is None and row["worker_id"] == "gpu-1"
    assert row["started_at"] <= row["completed_at"]
    results = row["results"]
    assert results["task"] == task
    assert results["progress"]["percent"] == 100.0 and results["progress"]["total_epochs"] == 2
    for key in ("mAP", "precision", "recall"):
        assert isinstance(results[key], float), key
    suffix = "(M)" if task == "segment" else "(B)"
    assert f"metrics/mAP50-95{suffix}" in results["metrics"]
    names = {a["name"] for a in results["artifacts"]}
    assert {"best.pt", "last.pt", "results.csv", "args.yaml"} <= names
    if task == "segment":
        assert any(name.endswith(".png") for name in names), names
    # The run's workspace is removed once the row is final.
    wait_for_sync(lambda: not Path(results["run_dir"]).exists(), timeout=30, what="workspace removed")
    best = Path(row["trained_model_url"].removeprefix("file://"))
    assert best.is_file() and best.as_posix().endswith(f"training_runs/{run_id}/weights/best.pt")

    from ultralytics import YOLO

    model = YOLO(str(best))
    assert model.task == task
    assert snapshot(data.parent) == before, "the user's dataset files were modified"
    audit = tmp_path / "audit.log"
    lines = audit.read_text().splitlines() if audit.exists() else []
    assert not [line for line in lines if "socket.connect" in line or "getaddrinfo" in line], lines


def test_training_learns_on_the_synthetic_set(database_url: str, tmp_path: Path, agent: AgentProc) -> None:
    # Measured: about 40 epochs at imgsz 128 on 64 images give mAP50 around 0.5-0.7 in about a minute.
    data = make_dataset(tmp_path / "learn", "detect", train=64, val=16, imgsz=128)
    run_id = submit(database_url, data, task="detect", epochs=40, imgSize=128, batchSize=16)
    row = wait_status(database_url, run_id, "completed", "failed", timeout=400)
    assert row["status"] == "completed", row["error_message"]
    assert row["results"]["mAP50"] > 0.2, row["results"]


def test_cancel_mid_epoch_stops_the_real_trainer_within_two_seconds(
    database_url: str, tmp_path: Path, agent: AgentProc
) -> None:
    data = make_dataset(tmp_path / "c", "detect", train=32, val=4, imgsz=64)
    run_id = submit(database_url, data, task="detect", epochs=100, batchSize=2)
    pid = trainer_pid(agent, run_id)
    wait_for_sync(
        lambda: (
            ((fetch_run(database_url, run_id)["results"] or {}).get("progress") or {}).get("batch", 0) > 0
        ),
        timeout=120,
        what="training mid-epoch",
    )
    with psycopg.connect(database_url) as conn:
        conn.execute("update training_runs set cancel_requested = true where id = %s", (run_id,))
    asked = time.monotonic()
    wait_for_sync(lambda: not pid_alive(pid), timeout=10, interval=0.01, what="trainer gone")
    gone = time.monotonic() - asked
    row = wait_status(database_url, run_id, "canceled", timeout=10)
    assert gone < 2.0, f"trainer took {gone:.2f}s to stop"
    assert row["error_message"] == "Canceled by user." and row["canceled_at"] is not None
    import psutil

    assert not [p for p in psutil.process_iter(["pid"]) if _pgid(p.pid) == pid and p.status() != "zombie"]


def _pgid(pid: int) -> int | None:
    import os

    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_bad_requests_fail_clearly_and_the_agent_goes_on(
    database_url: str, tmp_path: Path, agent: AgentProc
) -> None:
    good = make_dataset(tmp_path / "good", "detect", train=8, val=2, imgsz=64)
    empty = make_dataset(tmp_path / "empty", "detect", train=4, val=2, imgsz=64)
    for label in (empty.parent / "labels").rglob("*.txt"):
        label.write_text("")
    malformed = make_dataset(tmp_path / "malformed", "detect", train=4, val=2, imgsz=64)
    for label in (malformed.parent / "labels").rglob("*.txt"):
        label.write_text("zero 0.5 0.5 0.2\n0 1.7 nan 0.1 0.1\n")
    outside = tmp_path / "outside" / "data.yaml"
    outside.parent.mkdir()
    outside.write_text("path: /etc\ntrain: images/train\nval: images/val\nnames: {0: a}\n")

    cases = {
        submit(database_url, good, base_model="ResNet50"): "base_model",
        submit(database_url, good, pretrained=True, task="detect"): "yolov8n.pt",
        submit(database_url, tmp_path / "nowhere" / "data.yaml"): "dataset YAML not found",
        submit(database_url, empty): "no labels found",
        submit(database_url, malformed): "no labels found",
        submit(database_url, outside): "outside",
        submit(database_url, good, epochs="ten"): "epochs",
    }
    for run_id, expected in cases.items():
        row = wait_status(database_url, run_id, "failed", "completed", timeout=60)
        assert row["status"] == "failed", (expected, row)
        assert expected in row["error_message"], (expected, row["error_message"])
    ok = submit(database_url, good, epochs=1, task="detect")
    assert wait_status(database_url, ok, "completed", "failed", timeout=120)["status"] == "completed"
