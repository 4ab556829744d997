"""The built-in fake trainer: plausible messages and files, no torch, starts in milliseconds.

Tests and benchmarks run it through the real child process and its parent side. Each epoch lasts
`fake.epoch_seconds` split into `fake.batches` batches; a stop is honoured within one batch.
`fake.crash_at_epoch` simulates a hard crash: an error line on stderr, exit code 3, no message.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from agent.domain.messages import BatchProgress, Done, EpochEnd, Started
from agent.ports import TrainJob
from agent.training.control import Control

CRASH_EXIT_CODE = 3
FAKE_WEIGHTS_MAGIC = b"SATURNOS-FAKE-WEIGHTS\n"
_PROGRESS_MIN_INTERVAL = 0.05


def run_fake(job: TrainJob, control: Control) -> None:
    """Run the fake training to completion, or raise StopRequested."""
    request = job.request
    fake = request.fake
    task = job.dataset.task if job.dataset is not None else (request.task or "detect")
    save_dir = job.workspace / "train"
    weights = save_dir / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    _write_args(save_dir / "args.yaml", job, task)

    start_epoch = _resume_epoch(job.resume_from) + 1
    total = request.epochs
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    note = "fake trainer" if visible is None else f"fake trainer; CUDA_VISIBLE_DEVICES={visible!r}"
    device = request.device or "cpu"
    control.send(Started(total_epochs=total, start_epoch=start_epoch, device=device, note=note))
    batch_seconds = fake.epoch_seconds / fake.batches
    t0 = time.monotonic()
    done_batches = 0
    remaining_total = (total - start_epoch + 1) * fake.batches
    last_sent = -math.inf
    best_fitness = -math.inf
    results = save_dir / "results.csv"
    row: dict[str, float] = {}

    for epoch in range(start_epoch, total + 1):
        control.check()
        for batch in range(1, fake.batches + 1):
            # Waiting on the stop event rather than sleeping is what makes a stop land within a batch.
            if control.stop_event.wait(batch_seconds):
                control.check()
            done_batches += 1
            if fake.crash_at_epoch == epoch:
                _crash(epoch)
            now = time.monotonic()
            if now - last_sent >= _PROGRESS_MIN_INTERVAL or batch == fake.batches:
                last_sent = now
                eta = (now - t0) / done_batches * (remaining_total - done_batches)
                control.send(
                    BatchProgress(
                        epoch=epoch,
                        total_epochs=total,
                        batch=batch,
                        batches=fake.batches,
                        losses=_losses(epoch, total, batch / fake.batches, task),
                        eta_seconds=round(eta, 3),
                    )
                )
        row = _metrics(epoch, total, task, lr=request.lr0)
        _append_row(results, epoch, time.monotonic() - t0, row)
        last = weights / "last.pt"
        _write_weights(last, epoch)
        fitness = row["metrics/mAP50-95(B)"]
        if fitness > best_fitness:
            best_fitness = fitness
            _write_weights(weights / "best.pt", epoch)
        control.last_epoch = epoch
        eta = (time.monotonic() - t0) / done_batches * (remaining_total - done_batches)
        control.send(
            EpochEnd(
                epoch=epoch, total_epochs=total, metrics=row, eta_seconds=round(eta, 3), checkpoint=str(last)
            )
        )
    if not (weights / "best.pt").exists():
        # A resume from the final epoch trains nothing; still leave the artifacts a run promises.
        _write_weights(weights / "best.pt", total)
        _write_weights(weights / "last.pt", total)
    control.send(Done(save_dir=str(save_dir), metrics=row or _metrics(total, total, task, lr=request.lr0)))


def _crash(epoch: int) -> None:
    message = f"RuntimeError: fake trainer crashed at epoch {epoch} (fakeCrashAtEpoch)"
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(CRASH_EXIT_CODE)


def _losses(epoch: int, total: int, progress: float, task: str) -> dict[str, float]:
    x = (epoch - 1 + progress) / max(total, 1)
    losses = {
        "train/box_loss": round(1.6 - 0.9 * x, 5),
        "train/cls_loss": round(2.8 - 2.0 * x, 5),
        "train/dfl_loss": round(1.5 - 0.4 * x, 5),
    }
    if task == "segment":
        losses["train/seg_loss"] = round(3.0 - 1.8 * x, 5)
    return losses


def _metrics(epoch: int, total: int, task: str, *, lr: float) -> dict[str, float]:
    """A row shaped like ultralytics' results.csv, improving smoothly with the epoch."""
    x = 1.0 - math.exp(-3.0 * epoch / max(total, 1))
    row = _losses(epoch, total, 1.0, task)
    row.update(
        {
            "metrics/precision(B)": round(0.2 + 0.6 * x, 5),
            "metrics/recall(B)": round(0.15 + 0.6 * x, 5),
            "metrics/mAP50(B)": round(0.1 + 0.7 * x, 5),
            "metrics/mAP50-95(B)": round(0.05 + 0.5 * x, 5),
        }
    )
    if task == "segment":
        row.update(
            {
                "metrics/precision(M)": round(0.18 + 0.6 * x, 5),
                "metrics/recall(M)": round(0.12 + 0.6 * x, 5),
                "metrics/mAP50(M)": round(0.08 + 0.65 * x, 5),
                "metrics/mAP50-95(M)": round(0.04 + 0.45 * x, 5),
            }
        )
    val_losses = _losses(epoch, total, 1.0, task)
    row.update({k.replace("train/", "val/"): round(v * 1.1, 5) for k, v in val_losses.items()})
    current_lr = round(lr * (1.0 - 0.99 * (epoch - 1) / max(total, 1)), 8)
    row.update({"lr/pg0": current_lr, "lr/pg1": current_lr, "lr/pg2": current_lr})
    return row


def _append_row(path: Path, epoch: int, elapsed: float, row: dict[str, float]) -> None:
    new = not path.exists()
    with path.open("a") as f:
        if new:
            f.write(",".join(["epoch", "time", *row]) + "\n")
        f.write(",".join([str(epoch), f"{elapsed:.3f}", *(f"{v:g}" for v in row.values())]) + "\n")


def _write_weights(path: Path, epoch: int) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(FAKE_WEIGHTS_MAGIC + json.dumps({"epoch": epoch}).encode() + b"\n")
    tmp.replace(path)


def _resume_epoch(checkpoint: Path | None) -> int:
    """The epoch a fake checkpoint was written after; 0 when absent or not a fake checkpoint."""
    if checkpoint is None:
        return 0
    try:
        data = checkpoint.read_bytes()
    except OSError:
        return 0
    if not data.startswith(FAKE_WEIGHTS_MAGIC):
        return 0
    try:
        return int(json.loads(data[len(FAKE_WEIGHTS_MAGIC) :])["epoch"])
    except (ValueError, KeyError, TypeError):
        return 0


def _write_args(path: Path, job: TrainJob, task: str) -> None:
    request = job.request
    data = job.dataset.yaml_path if job.dataset is not None else request.data_yaml
    args: dict[str, object] = {
        "task": task,
        "mode": "train",
        "model": job.model,
        "data": str(data),
        "epochs": request.epochs,
        "batch": request.batch,
        "imgsz": request.imgsz,
        "device": request.device or "cpu",
        "optimizer": request.optimizer,
        "lr0": request.lr0,
        "pretrained": request.pretrained,
        "project": str(job.workspace),
        "name": "train",
        "save_dir": str(job.workspace / "train"),
        # What the agent pinned this child to: lets tests check the slot a run got.
        "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        **request.augmentation,
    }
    # JSON scalars are valid YAML scalars, so no YAML library is needed here.
    path.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in args.items()))
