"""The Ultralytics YOLO trainer, run inside the child: the only module that imports ultralytics.

Ultralytics and torch are imported inside `run_yolo`, after the offline switches are set, so the
helpers here stay importable (and testable) without them.

AMP on an offline GPU host: ultralytics' `check_amp` (utils/checks.py) compares FP32 and AMP
inference of `yolo26n.pt`, downloading it first when it is not in its weights folder. Offline,
that download can only fail (after retries), and ultralytics then keeps AMP on anyway. We wrap
the check: when offline and the file is absent, skip the comparison and keep AMP on, as
ultralytics itself would after the failed download, but still turn it off on the GPUs that
ultralytics lists as broken for AMP. Online, or with the file present, the real check runs.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from agent.domain.messages import BatchProgress, Done, EpochEnd, Started, TrainerMessage, decode, encode
from agent.ports import TrainJob
from agent.training.control import Control

CONFIG_DIR_NAME = ".ultralytics"
FONT_NAMES = ("Arial.ttf", "Arial.Unicode.ttf")
AMP_CHECK_WEIGHTS = "yolo26n.pt"  # what ultralytics 8.4's check_amp loads
# The GPUs ultralytics' check_amp disables AMP on, before it would download anything.
_AMP_BROKEN_GPUS = re.compile(
    r"(nvidia|geforce|quadro|tesla).*?(1660|1650|1630|t400|t550|t600|t1000|t1200|t2000|k40m)", re.IGNORECASE
)
_OFFLINE_ENV = {"YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "0", "HF_HUB_OFFLINE": "1"}
# Integrations that phone home; off in our private offline settings.
_INTEGRATIONS_OFF = {
    "sync": False,
    "clearml": False,
    "comet": False,
    "dvc": False,
    "mlflow": False,
    "raytune": False,
    "tensorboard": False,
    "wandb": False,
}
DDP_MESSAGES = "ddp-messages.jsonl"  # rank 0's messages in the workspace, relayed by the child
_PROGRESS_MIN_INTERVAL = 0.2  # at most ~5 progress messages a second
_GPU_DEVICE = re.compile(r"^(cuda(:\d+)?|\d+(,\d+)*)$")


def run_yolo(job: TrainJob, control: Control, *, offline: bool, slow_batch: float = 0.0) -> None:
    """Train to completion and send Done, or raise StopRequested (or any error)."""
    dataset = job.dataset
    if dataset is None:
        raise ValueError("an ultralytics training needs a prepared dataset")
    if offline:
        prepare_offline(job.workspace, os.environ)
    control.check()

    import torch

    device, note = pick_device(job.request.device, torch.cuda.is_available())
    ddp = "," in device
    if ddp:
        note = "; ".join(n for n in (note, "multi-GPU (DDP) training: progress from rank 0") if n)
    if note:
        print(note, file=sys.stderr, flush=True)

    from ultralytics import settings
    from ultralytics.models import YOLO

    if offline:
        settings.update(_INTEGRATIONS_OFF)
    _guard_amp_check(offline)
    control.check()

    if job.resume_from is not None:
        why_not = _not_resumable(job.resume_from)
        if why_not:
            # A restart is better than a failed run: ultralytics would only assert "nothing to resume".
            restart = f"checkpoint {job.resume_from.name} cannot be resumed ({why_not}): starting over"
            print(restart, file=sys.stderr, flush=True)
            note = "; ".join(n for n in (note, restart) if n)
            job = replace(job, resume_from=None)
    source = str(job.resume_from) if job.resume_from is not None else trusted_model(job.model)
    # Trusted sources only: YOLO() unpickles a .pt and evaluates strings of a model YAML. `source`
    # is a checkpoint whose signature the parent verified, a file in WEIGHTS_DIR or the operator's
    # models bucket, a weights name ultralytics downloads from its releases, or a YAML packaged
    # with ultralytics (agent/training/weights.py).
    model = YOLO(source, task=dataset.task)
    relay = _RankZeroRelay(job.workspace / DDP_MESSAGES, control) if ddp else None
    reporter = _Reporter(relay.sink if relay else control, device_note=note, report_end=ddp)
    for event, callback in reporter.callbacks().items():
        model.add_callback(event, callback)
    if slow_batch > 0:
        model.add_callback("on_train_batch_start", lambda _: _tensor_work(slow_batch))
    if relay is None:
        model.train(**train_arguments(job, device))
        # A stop that comes after the last validation is too late to save anything: report Done.
        reporter.done()
        return
    # Multi-GPU: ultralytics pickles the callbacks into its DDP processes (this child's process
    # group) and waits for them; rank 0 writes its messages to a file that a thread here relays.
    # A stop aborts the wait at once, and the parent kills what is left of the group.
    relay.start()
    control.interruptible = True
    try:
        model.train(**train_arguments(job, device))
    finally:
        control.interruptible = False
        relay.close()
    if not relay.done:
        raise RuntimeError("multi-GPU training ended without reporting its result (see the log)")


def trusted_model(model: str) -> str:
    """`model`, after making sure a bare name cannot pick up a file from the workspace.

    Ultralytics looks a bare name up in the working directory (the run's workspace, where the
    dataset was downloaded) before its own packaged files and releases; a file of that name there
    would be loaded instead of ultralytics' own.
    """
    if Path(model).is_absolute():
        return model
    path = Path(model)
    # A scaled YAML name (yolov8n.yaml) is read as its unscaled file (yolov8.yaml).
    unified = path.with_stem(re.sub(r"(\d+)([nslmx])(.+)?$", r"\1\3", path.stem))
    for name in (path, unified):
        if name.exists():
            raise RuntimeError(f"refusing to load the model {model!r}: a file {name} is in the workspace")
    return model


def prepare_offline(workspace: Path, environ: MutableMapping[str, str]) -> Path:
    """Set the offline switches in `environ`; return ultralytics' config dir, seeded with fonts."""
    # Must run before ultralytics is imported: it reads these at import time. An operator's
    # YOLO_CONFIG_DIR is kept (and seeded); otherwise a private one in the workspace is used.
    environ.update(_OFFLINE_ENV)
    base = Path(environ.get("YOLO_CONFIG_DIR") or workspace / CONFIG_DIR_NAME)
    environ["YOLO_CONFIG_DIR"] = str(base)
    # Ultralytics keeps its settings and fonts in YOLO_CONFIG_DIR/Ultralytics.
    config_dir = base / "Ultralytics"
    config_dir.mkdir(parents=True, exist_ok=True)
    seed_fonts(config_dir)
    return config_dir


def seed_fonts(config_dir: Path) -> None:
    """Copy matplotlib's DejaVuSans as Arial.ttf / Arial.Unicode.ttf so plots never download a font."""
    font = _dejavu_sans()
    if font is None:
        print("matplotlib's DejaVuSans.ttf not found; plots may try to download a font", file=sys.stderr)
        return
    for name in FONT_NAMES:
        target = config_dir / name
        if target.is_file() and target.stat().st_size > 0:
            continue
        tmp = target.with_name(f".{name}.{os.getpid()}.tmp")
        shutil.copyfile(font, tmp)
        tmp.replace(target)


def _dejavu_sans() -> Path | None:
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        font = Path(location) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if font.is_file():
            return font
    return None


def pick_device(requested: str | None, cuda_available: bool) -> tuple[str, str]:
    """The ultralytics `device` argument, and a note for the log when it differs from the request."""
    # A GPU request on a host without CUDA trains on the CPU instead of failing: the web app sends
    # device 0 by default, so an explicit 0 cannot be told apart from no preference.
    if requested is None:
        return ("0", "") if cuda_available else ("cpu", "no CUDA device available: training on the CPU")
    if requested in ("cpu", "mps"):
        return requested, ""
    if _GPU_DEVICE.match(requested) and not cuda_available:
        return "cpu", f"device {requested!r} requested but no CUDA device is available: training on the CPU"
    return requested, ""


def train_arguments(job: TrainJob, device: str) -> dict[str, Any]:
    """Keyword arguments for `YOLO.train` from the job."""
    if job.dataset is None:
        raise ValueError("an ultralytics training needs a prepared dataset")
    request = job.request
    save_dir = job.workspace / "train"
    args: dict[str, Any] = {
        "data": str(job.dataset.yaml_path),
        "epochs": request.epochs,
        "batch": request.batch,
        "imgsz": request.imgsz,
        "lr0": request.lr0,
        "optimizer": request.optimizer,
        "device": device,
        "pretrained": request.pretrained,
        "plots": request.plots,
        "project": str(job.workspace),
        "name": save_dir.name,
        "exist_ok": True,
        **request.augmentation,
    }
    if request.workers is not None:
        args["workers"] = request.workers
    elif device == "cpu":
        # No forked dataloader workers on the CPU: they compete for the same cores, and a cancel
        # has fewer processes to take down.
        args["workers"] = 0
    if request.patience is not None:
        args["patience"] = request.patience
    if request.seed is not None:
        args["seed"] = request.seed
    if job.resume_from is not None:
        # Ultralytics unpickles this checkpoint again to resume: it is the one the parent verified
        # (signed by an agent). It takes the checkpoint's own arguments, including its old save_dir.
        args["resume"] = str(job.resume_from)
        args["save_dir"] = str(save_dir)
    return args


def _not_resumable(checkpoint: Path) -> str:
    """Why ultralytics cannot resume from `checkpoint`; empty when it can."""
    from ultralytics.nn import tasks

    if not checkpoint.is_file():
        return "file missing"  # and never let ultralytics look for it online
    load: Callable[[str], tuple[Any, str]] = tasks.torch_safe_load
    # Unpickles: `checkpoint` is the previous attempt's, loaded only after the parent checked the
    # agents' HMAC of its hash (core/pipeline.py `_fetch_checkpoint`).
    try:
        ckpt, _ = load(str(checkpoint))
    except Exception as exc:
        return f"unreadable: {type(exc).__name__}: {exc}"
    if not isinstance(ckpt, dict) or ckpt.get("optimizer") is None:
        return "no optimizer state, the training had finished"
    epoch = int(ckpt.get("epoch", -1))
    epochs = int((ckpt.get("train_args") or {}).get("epochs", 0))
    if epoch < 0 or epoch + 1 >= epochs:
        return f"saved after epoch {epoch + 1} of {epochs}"
    return ""


def _guard_amp_check(offline: bool) -> None:
    """Keep ultralytics' AMP check from downloading weights on an offline host (see module doc)."""
    import ultralytics.engine.trainer as engine
    from ultralytics.utils import WEIGHTS_DIR, checks

    current = engine.__dict__.get("check_amp")
    if current is None or getattr(current, "_saturnos_guard", False):
        return  # already guarded, or a version that checks AMP elsewhere
    real_check: Callable[[Any], bool] = checks.check_amp

    def check_amp(model: Any) -> bool:
        import torch

        device = next(model.parameters()).device
        if device.type != "cuda" or not offline or (Path(WEIGHTS_DIR) / AMP_CHECK_WEIGHTS).is_file():
            return bool(real_check(model))
        name = torch.cuda.get_device_name(device)
        if _AMP_BROKEN_GPUS.search(name):
            print(f"AMP: disabled on {name} (known AMP problems)", file=sys.stderr, flush=True)
            return False
        print(f"AMP: check skipped offline, no {AMP_CHECK_WEIGHTS} in {WEIGHTS_DIR}; AMP on", file=sys.stderr)
        return True

    check_amp._saturnos_guard = True  # type: ignore[attr-defined]
    # The trainer module imported check_amp by name; replace it where the trainer looks it up.
    engine.__dict__["check_amp"] = check_amp


class _Sink(Protocol):
    last_epoch: int | None
    interruptible: bool

    def send(self, msg: TrainerMessage) -> None: ...

    def check(self) -> None: ...


class _FileSink:
    """Where a DDP rank's reporter writes: rank 0 appends message lines to a file, others drop them.

    Picklable (ultralytics pickles the callbacks into each rank); stops come as signals to the group.
    """

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.last_epoch: int | None = None
        self.interruptible = False

    def send(self, msg: TrainerMessage) -> None:
        if int(os.environ.get("RANK", "-1")) in (-1, 0):
            with open(self.path, "ab") as f:
                f.write(encode(msg))

    def check(self) -> None:
        pass


class _RankZeroRelay:
    """A thread of the child that forwards rank 0's message file to the parent's pipe."""

    def __init__(self, path: Path, control: Control) -> None:
        path.unlink(missing_ok=True)
        path.touch()
        self.sink = _FileSink(path)
        self.done = False
        self._path = path
        self._control = control
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ddp-relay", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._closing.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        with open(self._path, "rb") as f:
            pending = b""
            while True:
                closing = self._closing.is_set()
                pending += f.read()
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self._forward(line)
                if closing:
                    return
                self._closing.wait(0.1)

    def _forward(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            msg = decode(line)
        except (ValueError, TypeError):
            return
        if isinstance(msg, EpochEnd):
            self._control.last_epoch = msg.epoch
        self.done = self.done or isinstance(msg, Done)
        self._control.send(msg)


class _Reporter:
    """Ultralytics callbacks: progress and epoch messages out, stop checks at every step."""

    def __init__(self, control: _Sink, *, device_note: str, report_end: bool = False) -> None:
        self._control = control
        self._report_end = report_end
        self._note = device_note
        self._t0 = time.monotonic()
        self._epoch_t0 = self._t0
        self._epoch_times: list[float] = []
        self._batch = 0
        self._last_sent = -math.inf
        self._pending_epoch: int | None = None
        self._final_metrics: dict[str, float] = {}
        self._save_dir: str | None = None
        self._total = 0

    def callbacks(self) -> dict[str, Callable[[Any], None]]:
        check = self._check
        return {
            "on_pretrain_routine_start": check,
            "on_pretrain_routine_end": check,
            "on_train_start": self._on_train_start,
            "on_train_epoch_start": self._on_train_epoch_start,
            "on_train_batch_start": check,
            "on_train_batch_end": self._on_train_batch_end,
            "on_train_epoch_end": self._on_train_epoch_end,
            "on_fit_epoch_end": self._on_fit_epoch_end,
            "on_val_batch_end": check,
            **({"on_train_end": lambda _: self.done()} if self._report_end else {}),
        }

    def done(self) -> None:
        if self._save_dir is None:
            raise RuntimeError("training ended without starting")
        self._control.send(Done(save_dir=self._save_dir, metrics=self._final_metrics))

    def _check(self, _: Any) -> None:
        self._control.check()

    def _on_train_start(self, trainer: Any) -> None:
        self._control.check()
        self._t0 = time.monotonic()
        self._total = int(trainer.epochs)
        self._save_dir = str(trainer.save_dir)
        self._control.send(
            Started(
                total_epochs=self._total,
                start_epoch=int(trainer.start_epoch) + 1,
                device=str(trainer.device),
                note=self._note,
            )
        )

    def _on_train_epoch_start(self, trainer: Any) -> None:
        self._control.check()
        self._epoch_t0 = time.monotonic()
        self._batch = 0
        # The training steps write no file the run keeps: a stop may abort them mid-batch.
        self._control.interruptible = True

    def _on_train_batch_end(self, trainer: Any) -> None:
        # The stop check comes first: this is what aborts a training within one batch.
        self._control.check()
        self._batch += 1
        now = time.monotonic()
        if now - self._last_sent < _PROGRESS_MIN_INTERVAL:
            return
        self._last_sent = now
        batches = len(trainer.train_loader)
        epoch = int(trainer.epoch) + 1
        self._control.send(
            BatchProgress(
                epoch=epoch,
                total_epochs=self._total,
                batch=self._batch,
                batches=batches,
                losses=_floats(trainer.label_loss_items(trainer.tloss, prefix="train")),
                eta_seconds=self._eta(now, epoch, batches),
            )
        )

    def _on_train_epoch_end(self, trainer: Any) -> None:
        # Validation and checkpoint writes follow: stops wait for the next safe point again.
        self._control.interruptible = False
        self._pending_epoch = int(trainer.epoch) + 1
        self._control.check()

    def _on_fit_epoch_end(self, trainer: Any) -> None:
        metrics = _floats(trainer.metrics)
        if self._pending_epoch is None:
            # final_eval() calls this hook once more for best.pt, with no epoch trained before it.
            self._final_metrics = metrics
            return
        epoch, self._pending_epoch = self._pending_epoch, None
        now = time.monotonic()
        self._epoch_times.append(now - self._epoch_t0)
        row = {
            **_floats(trainer.label_loss_items(trainer.tloss, prefix="train")),
            **metrics,
            **_floats(getattr(trainer, "lr", {})),
        }
        last = Path(trainer.last)
        self._final_metrics = metrics
        self._control.last_epoch = epoch
        mean_epoch = sum(self._epoch_times) / len(self._epoch_times)
        self._control.send(
            EpochEnd(
                epoch=epoch,
                total_epochs=self._total,
                metrics=row,
                eta_seconds=round(max(0, self._total - epoch) * mean_epoch, 1),
                checkpoint=str(last) if last.is_file() else None,
            )
        )
        self._control.check()

    def _eta(self, now: float, epoch: int, batches: int) -> float | None:
        if self._batch == 0 or batches == 0:
            return None
        epochs_after = max(0, self._total - epoch)
        left_in_epoch = 1.0 - self._batch / batches
        if self._epoch_times:
            mean_epoch = sum(self._epoch_times) / len(self._epoch_times)
        else:
            # No full epoch yet: extrapolate from this epoch's batches (validation not counted).
            mean_epoch = (now - self._epoch_t0) / self._batch * batches
        return round((left_in_epoch + epochs_after) * mean_epoch, 1)


def _tensor_work(seconds: float) -> None:
    """Small matrix products for `seconds`: stands in for the step of a big model."""
    import torch

    end = time.monotonic() + seconds
    x = torch.rand(128, 128)
    while time.monotonic() < end:
        x = torch.tanh(x @ x)


def _floats(values: Mapping[str, Any] | None) -> dict[str, float]:
    """The numeric entries as plain floats (ultralytics mixes tensors, numpy and Python numbers)."""
    out: dict[str, float] = {}
    for key, value in (values or {}).items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out[str(key)] = round(number, 6)
    return out
