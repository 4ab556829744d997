"""The agent's overhead on a real training: the same small run through the agent and bare.

    python bench/overhead.py [--quick]

The run: YOLOv8n from its yaml (pretrained false) on a synthetic detect dataset (128 train and
32 val images at 64 px), 5 epochs, imgsz 64, batch 8, Adam lr0 0.001, device cpu, workers 0,
plots off: the arguments the agent's child passes to Ultralytics for this configuration.

- agent_s: from the committed INSERT of the run to its committed `completed` row (bench trigger
  NOTIFY, as in pickup.py): pickup, dataset workspace, child start (Python, torch, Ultralytics),
  training, progress writes, artifact upload (the local blob store), final write.
- bare_s: `python bench/bare_train.py` in a subprocess, `YOLO('yolov8n.yaml').train(...)` with
  the same arguments and the same offline environment, from spawn to exit. Ultralytics' label
  cache is deleted before each bare run, since every agent run builds its own in its workspace.

They run alternately (bare, agent, bare, agent, ...) on an otherwise idle agent, and the ratio
is of the medians, to be fair on a noisy machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    PYTHON,
    REPO,
    AgentProcess,
    Bench,
    Postgres,
    StatusWatch,
    agent_env,
    emit,
    log,
    machine,
    parse_args,
    percentile,
)

WORKER = "bench-overhead"
EPOCHS, IMGSZ, BATCH = 5, 64, 8
CONFIG = {
    "task": "detect",
    "epochs": EPOCHS,
    "imgSize": IMGSZ,
    "batchSize": BATCH,
    "learningRate": 0.001,
    "optimizer": "Adam",
    "pretrained": False,
    "device": "cpu",
    "workers": 0,
    "plots": False,
}
OFFLINE_ENV = {"YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "0", "HF_HUB_OFFLINE": "1"}


def bare_run(bench: Bench, data: Path, index: int) -> float:
    for cache in data.parent.rglob("*.cache"):
        cache.unlink()
    project = bench.tmp / "bare" / str(index)
    arguments = {
        "data": str(data),
        "epochs": EPOCHS,
        "batch": BATCH,
        "imgsz": IMGSZ,
        "lr0": 0.001,
        "optimizer": "Adam",
        "device": "cpu",
        "pretrained": False,
        "plots": False,
        "project": str(project),
        "name": "train",
        "exist_ok": True,
        "workers": 0,
    }
    env = {**agent_env(bench.tmp, "bare"), **OFFLINE_ENV, "YOLO_CONFIG_DIR": str(project / ".ultralytics")}
    with (bench.tmp / f"bare-{index}.log").open("wb") as out:
        started = time.monotonic()
        proc = subprocess.run(
            [PYTHON, str(REPO / "bench" / "bare_train.py"), "yolov8n.yaml", json.dumps(arguments)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            timeout=600,
            check=False,
        )
        seconds = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(f"bare training failed ({proc.returncode}); see {out.name}")
    return seconds


def main() -> None:
    args = parse_args()
    pairs = 3 if args.quick else 5
    started = time.monotonic()
    agent_times: list[float] = []
    bare_times: list[float] = []
    with Bench() as bench:
        from agent.datasets.synthetic import make_dataset

        data = make_dataset(bench.tmp / "dataset", "detect", train=128, val=32, imgsz=IMGSZ)
        pg = Postgres(bench)
        db = pg.database()
        watch = StatusWatch(bench, db)
        agent = AgentProcess(
            agent_env(bench.tmp / "agent", WORKER, database_url=db.url, DATASET_ROOT=str(data.parent)),
            bench.tmp / "agent.log",
        ).start(bench)
        agent.wait_ready()
        with db.connect() as conn:
            for i in range(pairs):
                bare_times.append(bare_run(bench, data, i))
                run_id, committed = db.insert_run(conn, CONFIG, data_yaml=str(data), base_model="YOLOv8n")
                try:
                    done, _ = watch.wait(run_id, "completed", timeout=600)
                except TimeoutError:
                    error = db.scalar(
                        "select status || ': ' || coalesce(error_message, '') from training_runs"
                        " where id = %s",
                        (run_id,),
                    )
                    raise RuntimeError(f"agent run did not complete: {error}") from None
                agent_times.append(done - committed)
                log(f"pair {i + 1}/{pairs}: bare {bare_times[-1]:.2f}s, agent {agent_times[-1]:.2f}s")
    agent_s, bare_s = percentile(agent_times, 50), percentile(bare_times, 50)
    emit(
        {
            "bench": "overhead",
            "backend": "postgres",
            "pairs": pairs,
            "agent_s": round(agent_s, 2),
            "bare_s": round(bare_s, 2),
            "ratio": round(agent_s / bare_s, 3),
            "agent_runs_s": [round(t, 2) for t in agent_times],
            "bare_runs_s": [round(t, 2) for t in bare_times],
            "target_ratio": 1.10,
            "met": agent_s / bare_s <= 1.10,
            "wall_s": round(time.monotonic() - started, 1),
            **machine(),
        }
    )


if __name__ == "__main__":
    main()
