"""Cancel latency with the real Ultralytics trainer, mid-epoch, against the old 5 s cancel poll.

    python bench/cancel.py [--backend postgres|supabase] [--quick] [--slow-batches] [--takeover]

The training: YOLOv8n built from its yaml (pretrained false) on a synthetic detect dataset,
imgsz 64, batch 8, device cpu, workers 0, plots off, 50 epochs (never reached). The same
dataset and arguments serve the agent and the baseline.

Agent. For each cancel the bench inserts a run and waits for the agent's "trainer started" log
line (its `pid` field is the child) and for the first epoch's metrics in the row, then waits a
random 20-70 % of an epoch, so that the cancel lands mid-epoch, at a random batch of the second
epoch. t0 is taken right after the `cancel_requested = true` UPDATE returns (committed). Then:
- stop: until the child pid is gone (polled every millisecond in /proc; a zombie counts as gone);
- row: until the row's `canceled` status is committed (a bench trigger NOTIFYs every status
  change to a LISTEN connection of the bench).

Slow batches (--slow-batches): a big model at high resolution takes seconds per batch, so a stop
honoured at batch ends would take that long. The same agent measure on a second agent whose
trainer children do SLOW_BATCH_S of real tensor work at the start of every training batch
(SATURNOS_SLOW_BATCH_SECONDS, on top of the real Ultralytics step), on a 32-image dataset so that
an epoch stays short. The cancel comes at a random time, 10-90 % into a batch of the second epoch
(after the first epoch's metrics). `slow_stop_*`: until the child pid is gone; target 250 ms.

Takeover (--takeover): the same cancel points on a third agent with the default PROGRESS_INTERVAL
(2 s), but instead of a cancel the old script's unconditional claim (`status='running',
worker_id='old-script'`): `takeover_stop_*` until the child pid is gone. Without an event for it
the agent would notice only at its next fenced progress write, up to PROGRESS_INTERVAL later.

Baseline: bench/old_trainer.py trains in-process as the old script did, with a thread checking
for a cancel every 5 s (the old CANCEL_CHECK_INTERVAL), the stop effective at the end of the
epoch (`baseline_*`). `baseline_batch_*` is a second, kinder model of the old way: the thread
sets Ultralytics' `trainer.stop` directly, which Ultralytics 8.4 checks after every batch (and
then still validates and runs its final validation). Both are timed from the flag file's creation
to `model.train()` returning, on the same cancel points (20-70 % into the second epoch).
"""

from __future__ import annotations

import queue
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    PYTHON,
    REPO,
    AgentProcess,
    Bench,
    Database,
    Postgres,
    StatusWatch,
    agent_env,
    emit,
    kill_group,
    log,
    machine,
    ms_summary,
    parse_args,
    percentile,
    pid_alive,
    wait_until,
)
from bench.standin import supabase_env

WORKER = "bench-cancel"
IMGSZ, BATCH, EPOCHS = 64, 8, 50
TRAIN_IMAGES, VAL_IMAGES = 256, 32
SLOW_BATCH_S = 1.2
SLOW_TRAIN_IMAGES = 32
CONFIG = {
    "task": "detect",
    "epochs": EPOCHS,
    "imgSize": IMGSZ,
    "batchSize": BATCH,
    "pretrained": False,
    "device": "cpu",
    "workers": 0,
    "plots": False,
}


def make_dataset(bench: Bench, train: int = TRAIN_IMAGES, name: str = "dataset") -> Path:
    from agent.datasets.synthetic import make_dataset as make

    return make(bench.tmp / name, "detect", train=train, val=VAL_IMAGES, imgsz=IMGSZ)


def run_baseline(
    bench: Bench, data: Path, mode: str, cancels: int, rng: random.Random
) -> tuple[list[float], list[float]]:
    """(seconds from flag to training returned, epoch seconds seen) over `cancels` trainings."""
    work = bench.tmp / f"old-{mode}"
    work.mkdir()
    errlog = (bench.tmp / f"old-{mode}.log").open("wb")
    bench.callback(errlog.close)
    proc = subprocess.Popen(
        [
            PYTHON,
            str(REPO / "bench" / "old_trainer.py"),
            "--data",
            str(data),
            "--work",
            str(work),
            "--runs",
            str(cancels),
            "--mode",
            mode,
            "--imgsz",
            str(IMGSZ),
            "--batch",
            str(BATCH),
            "--epochs",
            str(EPOCHS),
        ],
        stdout=subprocess.PIPE,
        stderr=errlog,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    lines: queue.Queue[tuple[float, str]] = queue.Queue()
    assert proc.stdout is not None
    threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
    stops: list[float] = []
    epochs: list[float] = []
    try:
        for run in range(cancels):
            _, line = _next_line(lines, proc, timeout=180)
            if line.split()[:2] != ["epoch", str(run)]:
                raise RuntimeError(f"unexpected line from the old trainer: {line!r}")
            epoch_s = float(line.split()[2])
            time.sleep(rng.uniform(0.2, 0.7) * epoch_s)
            (work / f"cancel-{run}").touch()
            flagged = time.monotonic()
            while True:
                at, line = _next_line(lines, proc, timeout=120)
                if line.startswith("epoch "):
                    epochs.append(float(line.split()[2]))
                elif line == f"stopped {run}":
                    stops.append(at - flagged)
                    break
            log(f"old way ({mode}) cancel {run + 1}/{cancels}: stopped in {stops[-1]:.2f}s")
    finally:
        kill_group(proc, term_timeout=5)
    return stops, epochs


def _read_lines(stream: IO[bytes], out: queue.Queue[tuple[float, str]]) -> None:
    for raw in stream:
        out.put((time.monotonic(), raw.decode(errors="replace").strip()))


def _next_line(
    lines: queue.Queue[tuple[float, str]], proc: subprocess.Popen[bytes], timeout: float
) -> tuple[float, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return lines.get(timeout=0.5)
        except queue.Empty:
            if proc.poll() is not None and lines.empty():
                raise RuntimeError(f"the old trainer exited with {proc.returncode}") from None
    raise TimeoutError(f"no line from the old trainer within {timeout:.0f}s")


def first_epoch_done(db: Database, run_id: str) -> bool:
    row = db.scalar(
        "select coalesce(results->'metrics', '{}'::jsonb) <> '{}'::jsonb from training_runs where id = %s",
        (run_id,),
    )
    return bool(row)


# The old script's claim: unconditional, whoever holds the run.
TAKEOVER = (
    "update training_runs set status = 'running', worker_id = 'old-script', started_at = now() where id = %s"
)


def run_agent(
    bench: Bench,
    db: Database,
    backend: str,
    data: Path,
    cancels: int,
    epoch_s: float,
    rng: random.Random,
    slow_batch: float = 0.0,
    takeover: bool = False,
) -> tuple[list[float], list[float]]:
    """(child gone, row canceled) seconds; with `slow_batch`, the cancel lands within a slow batch.

    With `takeover`, another worker claims the run instead of a cancel: no row time is measured.
    """
    watch = StatusWatch(bench, db)
    name = "agent-slow" if slow_batch else "agent-takeover" if takeover else "agent"
    if backend == "supabase":
        env = agent_env(bench.tmp / name, WORKER, supabase=supabase_env(bench, db))
    else:
        env = agent_env(bench.tmp / name, WORKER, database_url=db.url)
    # The generated dataset's folder: on these backends local datasets must lie under a root.
    env.update(DATASET_ROOT=str(data.parent))
    if not takeover:
        env.update(PROGRESS_INTERVAL="0.5")
    if slow_batch:
        env.update(SATURNOS_SLOW_BATCH_SECONDS=str(slow_batch))
    agent = AgentProcess(env, bench.tmp / f"{name}.log").start(bench)
    agent.wait_ready()
    stops: list[float] = []
    rows: list[float] = []
    with db.connect() as conn:
        for i in range(cancels):
            run_id, _ = db.insert_run(conn, CONFIG, data_yaml=str(data), base_model="YOLOv8n")
            watch.wait(run_id, "running", timeout=30)
            pid = int(agent.wait_logged("trainer started", timeout=60, run_id=run_id)["pid"])
            wait_until(lambda run_id=run_id: first_epoch_done(db, run_id), 180, "first epoch", interval=0.02)
            if slow_batch:
                # The first batch of the next epoch has started by now; land inside one of its batches.
                time.sleep(slow_batch + rng.uniform(0.1, 0.9) * slow_batch)
            else:
                time.sleep(rng.uniform(0.2, 0.7) * epoch_s)
            if not pid_alive(pid):
                raise RuntimeError(f"the trainer of {run_id} ended before the cancel")
            if takeover:
                conn.execute(TAKEOVER, (run_id,))
            else:
                conn.execute("update training_runs set cancel_requested = true where id = %s", (run_id,))
            asked = time.monotonic()
            while pid_alive(pid):
                if time.monotonic() - asked > 30:
                    raise TimeoutError(f"trainer {pid} still alive 30 s after the change")
                time.sleep(0.001)
            stops.append(time.monotonic() - asked)
            if takeover:
                log(f"agent takeover {i + 1}/{cancels}: child gone in {stops[-1] * 1000:.0f} ms")
                continue
            rows.append(watch.wait(run_id, "canceled", timeout=30)[0] - asked)
            kind = "agent (slow batches)" if slow_batch else "agent"
            log(
                f"{kind} cancel {i + 1}/{cancels}: child gone in {stops[-1] * 1000:.0f} ms,"
                f" row canceled in {rows[-1] * 1000:.0f} ms"
            )
    agent.stop()  # frees the CPU for what comes next; stopping again at exit is harmless
    return stops, rows


def main() -> None:
    args = parse_args(
        backends=True,
        flags={
            "--slow-batches": f"also cancel within batches of {SLOW_BATCH_S}+ s",
            "--takeover": "also let the old script claim runs mid-epoch (default PROGRESS_INTERVAL)",
        },
    )
    cancels = 5 if args.quick else 12
    batch_cancels = 3 if args.quick else 8
    started = time.monotonic()
    rng = random.Random(7)
    with Bench() as bench:
        data = make_dataset(bench)
        log("baseline: the old 5 s cancel poll, stop at the end of the epoch")
        old_stops, epochs = run_baseline(bench, data, "epoch_end", cancels, rng)
        epoch_s = percentile(epochs, 50)
        log(f"epoch: {epoch_s:.2f}s; baseline 2: the stop flag set directly")
        batch_stops, _ = run_baseline(bench, data, "batch", batch_cancels, rng)
        pg = Postgres(bench)
        stops, rows = run_agent(bench, pg.database(), args.backend, data, cancels, epoch_s, rng)
        slow: dict[str, object] = {}
        if args.takeover:
            db = pg.database()
            taken, _ = run_agent(bench, db, args.backend, data, cancels, epoch_s, rng, takeover=True)
            slow.update(ms_summary(taken, "takeover_stop_", qs=(50, 99)))
            slow["takeover_met"] = percentile(taken, 99) <= 1.0
        if args.slow_batches:
            small = make_dataset(bench, train=SLOW_TRAIN_IMAGES, name="dataset-slow")
            slow_stops, _ = run_agent(
                bench, pg.database(), args.backend, small, cancels, epoch_s, rng, slow_batch=SLOW_BATCH_S
            )
            slow = {
                **ms_summary(slow_stops, "slow_stop_", qs=(50, 99)),
                "slow_batch_s": SLOW_BATCH_S,
                "target_slow_stop_p99_ms": 250,
                "slow_met": percentile(slow_stops, 99) <= 0.25,
            }
    result = {
        "bench": "cancel",
        "backend": args.backend,
        "cancels": len(stops),
        **ms_summary(stops, "stop_", qs=(50, 99)),
        **ms_summary(rows, "row_", qs=(50, 99)),
        **ms_summary(old_stops, "baseline_stop_", qs=(50, 99)),
        **ms_summary(batch_stops, "baseline_batch_stop_", qs=(50, 99)),
        "epoch_s": round(epoch_s, 2),
        "imgsz": IMGSZ,
        "target_stop_p99_ms": 1000,
        "target_row_p99_ms": 1500,
        "met": percentile(stops, 99) <= 1.0 and percentile(rows, 99) <= 1.5,
        **slow,
        "wall_s": round(time.monotonic() - started, 1),
        **machine(),
    }
    emit(result)


if __name__ == "__main__":
    main()
