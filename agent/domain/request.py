"""The training request: row fields plus `configuration`, parsed and validated.

Keys follow the web app (camelCase) and the old script's defaults. Every bad value raises
InvalidRequest naming the key, so the run fails with a message the user can act on.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from agent.domain.errors import InvalidRequest
from agent.domain.run import RunRow
from agent.domain.untrusted import MAX_STRING_CHARS, Unreadable, json_problem, load_json

Task = Literal["detect", "segment"]
TrainerKind = Literal["ultralytics", "fake"]

DEFAULT_BASE_MODEL = "YOLOv8s"
OPTIMIZERS = ("SGD", "Adam", "Adamax", "AdamW", "NAdam", "RAdam", "RMSProp", "auto")
_TASK_ALIASES: dict[str, Task] = {
    "detect": "detect",
    "detection": "detect",
    "det": "detect",
    "segment": "segment",
    "segmentation": "segment",
    "seg": "segment",
}
# (low, high) inclusive, as ultralytics documents them.
AUGMENTATION_RANGES: dict[str, tuple[float, float]] = {
    "hsv_h": (0.0, 1.0),
    "hsv_s": (0.0, 1.0),
    "hsv_v": (0.0, 1.0),
    "degrees": (-180.0, 180.0),
    "translate": (0.0, 1.0),
    "scale": (0.0, 1.0),
    "shear": (-180.0, 180.0),
    "perspective": (0.0, 0.001),
    "flipud": (0.0, 1.0),
    "fliplr": (0.0, 1.0),
    "mosaic": (0.0, 1.0),
    "mixup": (0.0, 1.0),
    "copy_paste": (0.0, 1.0),
}
# Known models: the name in the row, and the weights ultralytics publishes for it.
_HUB_MODEL = re.compile(r"^(yolov8|yolo11)([nsmlx])(-seg)?$", re.IGNORECASE)
_HUB_WEIGHTS = re.compile(r"^(yolov8|yolo11)[nsmlx](-seg)?\.(pt|yaml)$")
# Any other model is a plain file name, resolved only inside WEIGHTS_DIR (or the models bucket):
# no folder, no `..`, no scheme, so a row can never point the trainer at a file it left elsewhere.
_MODEL_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
MODEL_FILE_SUFFIXES = (".pt",)
MODEL_YAML_SUFFIXES = (".yaml", ".yml")
MAX_DATA_YAML_CHARS = MAX_STRING_CHARS
_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?|\d+(\s*,\s*\d+)*)$", re.IGNORECASE)
MIN_IMGSZ, MAX_IMGSZ = 32, 4096


@dataclass(frozen=True, slots=True)
class FakeOptions:
    """Knobs of the built-in fake trainer (tests, benchmarks, smoke checks)."""

    epoch_seconds: float = 0.2
    batches: int = 5
    crash_at_epoch: int | None = None


@dataclass(frozen=True, slots=True)
class TrainingRequest:
    data_yaml: str
    base_model: str
    task: Task | None
    epochs: int
    batch: int
    imgsz: int
    lr0: float
    optimizer: str
    device: str | None  # None: the request did not say; the child picks cuda:0 or cpu
    pretrained: bool
    augmentation: Mapping[str, float]
    trainer: TrainerKind = "ultralytics"
    plots: bool = True
    workers: int | None = None
    patience: int | None = None
    seed: int | None = None
    fake: FakeOptions = field(default_factory=FakeOptions)
    notes: tuple[str, ...] = ()


def configuration_of(raw: object) -> dict[str, object]:
    """`configuration` as a dict: a JSON object, a JSON string of one, or nothing."""
    if raw is None:
        return {}
    if isinstance(raw, (bytes, bytearray)):
        raw = raw.decode("utf-8", errors="replace")
    if isinstance(raw, str):
        if not raw.strip():
            return {}
        if raw.lstrip()[:1] not in ("{", "["):
            raise InvalidRequest("configuration", raw, "must be a JSON object")
        raw = load_json(raw)
    if isinstance(raw, Unreadable):
        raise InvalidRequest("configuration", None, raw.reason)
    if not isinstance(raw, dict):
        raise InvalidRequest("configuration", raw, "must be a JSON object")
    problem = json_problem(raw)
    if problem:
        raise InvalidRequest("configuration", None, problem)
    return {str(k): v for k, v in raw.items()}


def parse_request(row: RunRow) -> TrainingRequest:
    cfg = configuration_of(row.configuration)
    notes: list[str] = []

    data_yaml = _first(row.data_yaml, cfg.get("dataYaml"), cfg.get("data_yaml"))
    if data_yaml is None:
        raise InvalidRequest(
            "data_yaml", None, "is required (row column data_yaml or configuration.dataYaml)"
        )
    if not isinstance(data_yaml, str) or not data_yaml.strip():
        raise InvalidRequest("data_yaml", data_yaml, "must be a non-empty string")
    if len(data_yaml) > MAX_DATA_YAML_CHARS:
        raise InvalidRequest("data_yaml", data_yaml, f"is longer than {MAX_DATA_YAML_CHARS} characters")
    if "\x00" in data_yaml:
        raise InvalidRequest("data_yaml", data_yaml, "must not contain NUL characters")

    base_model = _first(row.base_model, cfg.get("baseModel"), cfg.get("base_model")) or DEFAULT_BASE_MODEL
    base_model = check_base_model(base_model)

    task = _task(cfg)
    epochs = _int(cfg, "epochs", 100, low=1, high=100_000)
    batch = _int(cfg, "batchSize", 16, low=-1, high=65_536)
    if batch == 0 or batch < -1:
        raise InvalidRequest("batchSize", cfg.get("batchSize"), "must be >= 1, or -1 for auto")
    imgsz = _int(cfg, "imgSize", 640, low=MIN_IMGSZ, high=MAX_IMGSZ)
    if imgsz % 32:
        rounded = math.ceil(imgsz / 32) * 32
        notes.append(f"imgSize {imgsz} is not a multiple of 32; ultralytics rounds it up to {rounded}")
    lr0 = _float(cfg, "learningRate", 0.001, low=0.0, high=1.0, low_open=True)
    optimizer = _optimizer(cfg.get("optimizer", "Adam"))
    device = _device(cfg.get("device", 0))
    gpu_count = _opt_int(cfg, "gpuCount", low=1, high=64)
    if gpu_count is not None:
        # A count, not indexes: the agent pins the run to that many free GPUs, seen as 0..n-1.
        device = ",".join(str(i) for i in range(gpu_count))
    pretrained = _bool(cfg, "pretrained", True)
    augmentation = _augmentation(cfg, notes)
    trainer = cfg.get("trainer", "ultralytics")
    if trainer not in ("ultralytics", "fake"):
        raise InvalidRequest("trainer", trainer, "must be 'ultralytics' or 'fake'")

    return TrainingRequest(
        data_yaml=data_yaml.strip(),
        base_model=base_model,
        task=task,
        epochs=epochs,
        batch=batch,
        imgsz=imgsz,
        lr0=lr0,
        optimizer=optimizer,
        device=device,
        pretrained=pretrained,
        augmentation=augmentation,
        trainer="fake" if trainer == "fake" else "ultralytics",
        plots=_bool(cfg, "plots", True),
        workers=_opt_int(cfg, "workers", low=0, high=64),
        patience=_opt_int(cfg, "patience", low=0, high=100_000),
        seed=_opt_int(cfg, "seed", low=0, high=2**31 - 1),
        fake=FakeOptions(
            epoch_seconds=_float(cfg, "fakeEpochSeconds", 0.2, low=0.0, high=3600.0),
            batches=_int(cfg, "fakeBatches", 5, low=1, high=10_000),
            crash_at_epoch=_opt_int(cfg, "fakeCrashAtEpoch", low=1, high=100_000),
        ),
        notes=tuple(notes + _ignored_keys(cfg)),
    )


def check_base_model(value: object) -> str:
    """A known model name or a plain model file name; InvalidRequest for anything else."""
    if not isinstance(value, str):
        raise InvalidRequest("base_model", value, "must be a string")
    name = value.strip()
    known = "use YOLOv8n|s|m|l|x or YOLO11n|s|m|l|x, or the file name of a model in WEIGHTS_DIR"
    if _HUB_MODEL.match(name):
        return name
    if "://" in name or name.lower().startswith(("storage:", "http:", "https:", "file:")):
        raise InvalidRequest("base_model", value, f"must not be a URL; {known}")
    if "/" in name or "\\" in name or name.startswith("~"):
        raise InvalidRequest("base_model", value, f"must be a file name, not a path; {known}")
    if ".." in name:
        raise InvalidRequest("base_model", value, f"must not contain '..'; {known}")
    if not _MODEL_FILE.match(name) or not name.lower().endswith(MODEL_FILE_SUFFIXES + MODEL_YAML_SUFFIXES):
        raise InvalidRequest("base_model", value, f"unknown model; {known}")
    return name


def is_model_yaml(name: str) -> bool:
    return name.lower().endswith(MODEL_YAML_SUFFIXES)


def is_hub_weights(name: str) -> bool:
    """A weights or yaml name ultralytics itself publishes (downloadable, or packaged)."""
    return _HUB_WEIGHTS.match(name) is not None


def model_reference(base_model: str, task: Task, pretrained: bool) -> str:
    """`YOLOv8n` → `yolov8n.pt` / `yolov8n-seg.pt` (or `.yaml` from scratch); file names unchanged."""
    m = _HUB_MODEL.match(base_model)
    if m is None:
        return base_model
    suffix = "-seg" if task == "segment" else ""
    return f"{m.group(1).lower()}{m.group(2).lower()}{suffix}.{'pt' if pretrained else 'yaml'}"


def _first(*values: object) -> object:
    for v in values:
        if v is not None and v != "":
            return v
    return None


def _short(value: object, limit: int = 80) -> object:
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + "…"
    return value


def _task(cfg: Mapping[str, object]) -> Task | None:
    for key in ("task", "modelTask", "trainingTask"):
        value = cfg.get(key)
        if value is None or value == "":
            continue
        if not isinstance(value, str) or value.strip().lower() not in _TASK_ALIASES:
            raise InvalidRequest(key, value, "must be 'detect' or 'segment'")
        return _TASK_ALIASES[value.strip().lower()]
    return None


def _number(key: str, value: object) -> float:
    if isinstance(value, bool):
        raise InvalidRequest(key, value, "must be a number, not a boolean")
    if isinstance(value, int) and value.bit_length() > 64:
        raise InvalidRequest(key, value, "is out of range")
    if isinstance(value, (int, float)):
        result = float(value)
    elif isinstance(value, str):
        if len(value) > 64:
            raise InvalidRequest(key, value, "must be a number")
        try:
            result = float(value.strip())
        except ValueError:
            raise InvalidRequest(key, value, "must be a number") from None
    else:
        raise InvalidRequest(key, value, "must be a number")
    if not math.isfinite(result):
        raise InvalidRequest(key, value, "must be a finite number")
    return result


def _int(cfg: Mapping[str, object], key: str, default: int, *, low: int, high: int) -> int:
    value = cfg.get(key)
    if value is None:
        return default
    number = _number(key, value)
    if not number.is_integer():
        raise InvalidRequest(key, value, "must be a whole number")
    if not low <= number <= high:
        raise InvalidRequest(key, value, f"must be between {low} and {high}")
    return int(number)


def _opt_int(cfg: Mapping[str, object], key: str, *, low: int, high: int) -> int | None:
    return None if cfg.get(key) is None else _int(cfg, key, 0, low=low, high=high)


def _float(
    cfg: Mapping[str, object], key: str, default: float, *, low: float, high: float, low_open: bool = False
) -> float:
    value = cfg.get(key)
    if value is None:
        return default
    number = _number(key, value)
    if number > high or number < low or (low_open and number == low):
        bound = f"> {low}" if low_open else f">= {low}"
        raise InvalidRequest(key, value, f"must be {bound} and <= {high}")
    return number


def _bool(cfg: Mapping[str, object], key: str, default: bool) -> bool:
    value = cfg.get(key)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise InvalidRequest(key, value, "must be true or false")


def _optimizer(value: object) -> str:
    if isinstance(value, str):
        for name in OPTIMIZERS:
            if name.lower() == value.strip().lower():
                return name
    raise InvalidRequest("optimizer", value, f"must be one of {', '.join(OPTIMIZERS)}")


def _device(value: object) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise InvalidRequest("device", value, "must be a GPU index, a list of indexes, or 'cpu'")
    if isinstance(value, int):
        if value < 0:
            raise InvalidRequest("device", value, "must be >= 0")
        return str(value)
    if (
        isinstance(value, list)
        and value
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    ):
        return ",".join(str(v) for v in value)
    if isinstance(value, str) and _DEVICE.match(value.strip()):
        return value.strip().lower().replace(" ", "")
    raise InvalidRequest("device", value, "must be a GPU index, a list of indexes, 'cuda:N', 'mps' or 'cpu'")


def _augmentation(cfg: Mapping[str, object], notes: list[str]) -> dict[str, float]:
    """Known augmentation values, validated; unknown keys and the app's `preset` label are not errors.

    The old script also read augmentation keys from the top level of `configuration`; those apply
    where `augmentation` does not set the key.
    """
    value = cfg.get("augmentation")
    if isinstance(value, str) and value.strip():
        # Decoded within the same limits as the configuration it came in (agent/domain/untrusted.py).
        value = load_json(value)
        if isinstance(value, Unreadable):
            raise InvalidRequest("augmentation", None, value.reason)
    if value is None or value == "":
        value = {}
    if not isinstance(value, dict):
        raise InvalidRequest("augmentation", _short(value), "must be an object of augmentation values")
    result: dict[str, float] = {}
    unknown: list[str] = []
    for key, raw in value.items():
        if key == "preset":
            # The web app's label for the values it sends along ('standard', 'custom', ...).
            continue
        if key not in AUGMENTATION_RANGES:
            unknown.append(f"augmentation.{key}")
        elif raw is not None:
            result[key] = _augmentation_value(f"augmentation.{key}", key, raw)
    for key in AUGMENTATION_RANGES:
        if key not in result and cfg.get(key) is not None:
            result[key] = _augmentation_value(key, key, cfg[key])
    notes.extend(_ignored("not an augmentation setting", unknown))
    return result


def _augmentation_value(name: str, key: str, raw: object) -> float:
    low, high = AUGMENTATION_RANGES[key]
    number = _number(name, raw)
    if not low <= number <= high:
        raise InvalidRequest(name, raw, f"must be between {low} and {high}")
    return number


# Keys the web app sends that do not change a training: the run's display name, the dialog's
# compute choice (already turned into `device`), and its hyper-parameter search settings.
APP_KEYS = frozenset({"runName", "compute", "optimizationStrategy", "bayesianConfig"})
# Every key parse_request reads.
KNOWN_KEYS = frozenset(
    {
        *("dataYaml", "data_yaml", "baseModel", "base_model", "task", "modelTask", "trainingTask"),
        *("epochs", "batchSize", "imgSize", "learningRate", "optimizer", "device", "pretrained"),
        *("augmentation", "trainer", "plots", "workers", "patience", "seed"),
        *("fakeEpochSeconds", "fakeBatches", "fakeCrashAtEpoch"),
        *AUGMENTATION_RANGES,
    }
)
_MAX_IGNORED_NOTED = 20


def _ignored_keys(cfg: Mapping[str, object]) -> list[str]:
    """Notes for the keys that the agent does not act on; like the old script, they are no error."""
    notes: list[str] = []
    strategy = cfg.get("optimizationStrategy")
    if strategy not in (None, "", "manual"):
        notes.append(
            f"optimizationStrategy={_short(strategy)!r} ignored: the run trains once with the values given"
        )
    unknown = [f"configuration.{k}" for k in cfg if k not in KNOWN_KEYS and k not in APP_KEYS]
    return notes + _ignored("not a training setting", unknown)


def _ignored(why: str, keys: list[str]) -> list[str]:
    """One note per ignored key, bounded: a row with thousands of keys must not flood the log."""
    notes = [f"{_short(key, 60)} ignored: {why}" for key in keys[:_MAX_IGNORED_NOTED]]
    if len(keys) > _MAX_IGNORED_NOTED:
        notes.append(f"{len(keys) - _MAX_IGNORED_NOTED} more keys ignored: {why}")
    return notes
