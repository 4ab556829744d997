"""The old script's cancel path, for the cancel benchmark's baseline (run by bench/cancel.py).

    python bench/old_trainer.py --data DATA_YAML --work DIR --runs N [--mode epoch_end|batch] ...

Trains N times in this one process, as the old script did (in-process Ultralytics). A thread
checks for a cancel every 5 s (the old CANCEL_CHECK_INTERVAL); here the cancel is a flag file
`DIR/cancel-<i>` written by the bench instead of a `cancel_requested` row read every 5 s: the
same timing, without the query. What a seen cancel does depends on --mode:

- epoch_end (the old script, as its README and the design describe it): the stop flag is acted
  on at the end of the epoch (`on_train_epoch_end` sets `trainer.stop`); Ultralytics then
  validates, saves, runs its final validation of best.pt and returns.
- batch: the thread sets `trainer.stop` at once; Ultralytics 8.4 checks it after every batch,
  then still validates, saves and runs the final validation. (Older releases only looked at it
  at the end of the epoch.)

Protocol on stdout, one line each: `epoch <i> <seconds>` at every epoch end of training i,
`stopped <i>` when training i returned. Epoch times go to the bench for its report.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

CANCEL_CHECK_INTERVAL = 5.0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--runs", type=int, required=True)
    p.add_argument("--mode", choices=("epoch_end", "batch"), default="epoch_end")
    p.add_argument("--imgsz", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--epochs", type=int, default=50)
    args = p.parse_args()

    # The protocol keeps the real stdout; everything else printed (Ultralytics' progress bars) goes
    # to stderr, so that a protocol line never shares a line with a progress bar.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(args.work / "ultralytics-config"))
    from ultralytics import YOLO

    state: dict[str, Any] = {"run": None, "trainer": None, "cancel_seen": False}

    def cancel_poll() -> None:
        while True:
            time.sleep(CANCEL_CHECK_INTERVAL)
            run = state["run"]
            if run is not None and (args.work / f"cancel-{run}").exists():
                state["cancel_seen"] = True
                if args.mode == "batch" and state["trainer"] is not None:
                    state["trainer"].stop = True

    threading.Thread(target=cancel_poll, name="cancel-poll", daemon=True).start()

    for run in range(args.runs):
        state.update(run=run, trainer=None, cancel_seen=False)
        state["epoch_started"] = time.monotonic()

        def on_train_start(trainer: Any) -> None:
            state["trainer"] = trainer
            state["epoch_started"] = time.monotonic()

        def on_train_epoch_end(trainer: Any) -> None:
            if state["cancel_seen"]:
                trainer.stop = True

        def on_fit_epoch_end(trainer: Any, run: int = run) -> None:
            now = time.monotonic()
            print(f"epoch {run} {now - state['epoch_started']:.3f}", file=proto, flush=True)
            state["epoch_started"] = now

        model = YOLO("yolov8n.yaml")
        model.add_callback("on_train_start", on_train_start)
        model.add_callback("on_train_epoch_end", on_train_epoch_end)
        model.add_callback("on_fit_epoch_end", on_fit_epoch_end)
        model.train(
            data=args.data,
            epochs=args.epochs,
            imgsz=args.imgsz,
            batch=args.batch,
            device="cpu",
            workers=0,
            pretrained=False,
            plots=False,
            optimizer="Adam",
            lr0=0.001,
            project=str(args.work / "runs"),
            name=f"r{run}",
            exist_ok=True,
            verbose=False,
        )
        state["run"] = None
        print(f"stopped {run}", file=proto, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
