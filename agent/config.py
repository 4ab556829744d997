"""The one reader of the environment: every setting, its default and its validation."""

from __future__ import annotations

import os
import re
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from agent.domain.errors import AgentError
from agent.domain.redact import quote, register_secret, url_password

Backend = Literal["supabase", "postgres", "embedded"]
ShutdownMode = Literal["wait", "release"]
UrlMode = Literal["public", "signed"]


_GPU_ID = re.compile(r"^(\d+|(GPU|MIG)-[0-9A-Za-z/-]+)$")


class ConfigError(AgentError):
    def __init__(self, key: str, value: str, reason: str) -> None:
        super().__init__(f"Invalid setting {key}={quote(value)}: {reason}")
        self.key = key


def _default_data_dir() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "saturnos-agent"


@dataclass(frozen=True)
class Settings:
    supabase_url: str | None = None
    # Secrets stay out of repr(settings), which a traceback or a debug line could show.
    supabase_service_role_key: str | None = field(default=None, repr=False)
    database_url: str | None = field(default=None, repr=False)
    data_dir: Path = field(default_factory=_default_data_dir)
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}")
    dataset_root: Path | None = None
    runs_dir: Path | None = None
    weights_dir: Path | None = None
    dataset_cache_dir: Path | None = None
    artifacts_dir: Path | None = None
    supabase_artifacts_bucket: str = "training-artifacts"
    supabase_datasets_bucket: str = "datasets"
    artifact_url_mode: UrlMode = "public"
    signed_url_ttl: int = 7 * 24 * 3600
    poll_interval: float = 60.0
    degraded_poll_interval: float = 5.0
    heartbeat_interval: float = 10.0
    progress_interval: float = 2.0
    checkpoint_interval: float = 300.0
    stale_after: float = 120.0
    max_attempts: int = 3
    max_concurrent_runs: int | None = None  # None: one per device
    devices: str | None = None  # None: every visible CUDA device, else the CPU
    metrics_port: int | None = None  # None: no metrics or health endpoint
    shutdown_mode: ShutdownMode = "wait"
    stop_grace: float = 3.0
    kill_grace: float = 3.0
    offline: bool | None = None  # None: probe at start
    download_concurrency: int = 16
    dataset_relist_after: float = 0.0  # 0: list a remote dataset's folders at every run
    allowed_dataset_roots: tuple[Path, ...] = ()  # besides DATASET_ROOT; `:`-separated
    allowed_dataset_buckets: tuple[str, ...] = ()  # besides SUPABASE_DATASETS_BUCKET; comma-separated
    allow_private_dataset_urls: bool = False
    dataset_cache_max_gb: float = 50.0
    min_free_disk_gb: float = 2.0
    keep_failed_workspaces: bool = False
    max_kept_workspaces: int = 5
    log_level: str = "INFO"
    log_json: bool = False
    # None: on for the embedded backend (local trials), off for supabase and postgres.
    allow_fake_trainer: bool | None = None
    allow_row_model_yaml: bool = False
    supabase_models_bucket: str | None = None
    agent_secret: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # Whatever builds settings, their secrets are masked in every log line and message from now on.
        register_secret(self.supabase_service_role_key)
        register_secret(self.agent_secret)
        register_secret(url_password(self.database_url))
        register_secret(url_password(self.supabase_url))

    @property
    def fake_trainer_allowed(self) -> bool:
        if self.allow_fake_trainer is not None:
            return self.allow_fake_trainer
        return self.backend == "embedded"

    @property
    def agent_secret_file(self) -> Path:
        """Where the embedded backend keeps the key it signs checkpoints with."""
        return self.data_dir / "agent_secret"

    @property
    def backend(self) -> Backend:
        if self.supabase_url:
            return "supabase"
        if self.database_url:
            return "postgres"
        return "embedded"

    @property
    def device_list(self) -> tuple[str, ...] | None:
        """DEVICES as a tuple ("cpu",) or GPU indexes/UUIDs; None to detect them."""
        if self.devices is None or self.devices.strip().lower() in ("", "auto"):
            return None
        items = tuple(d.strip() for d in self.devices.split(",") if d.strip())
        if items == ("cpu",):
            return items
        bad = [d for d in items if not _GPU_ID.match(d)]
        if not items or bad or len(set(items)) != len(items):
            raise ConfigError(
                "DEVICES", self.devices, "must be cpu, auto, or distinct GPU indexes or UUIDs (0,1,2,3)"
            )
        return items

    @property
    def runs_root(self) -> Path:
        return self.runs_dir or self.data_dir / "runs"

    @property
    def cache_root(self) -> Path:
        return self.dataset_cache_dir or self.data_dir / "cache" / "datasets"

    @property
    def dataset_roots(self) -> tuple[Path, ...]:
        """Folders local datasets may come from: DATASET_ROOT first, then ALLOWED_DATASET_ROOTS."""
        first = (self.dataset_root,) if self.dataset_root is not None else ()
        return tuple(dict.fromkeys((*first, *self.allowed_dataset_roots)))

    @property
    def dataset_buckets(self) -> tuple[str, ...]:
        """Storage buckets datasets may come from."""
        return tuple(dict.fromkeys((self.supabase_datasets_bucket, *self.allowed_dataset_buckets)))

    @property
    def artifacts_root(self) -> Path:
        return self.artifacts_dir or self.data_dir / "artifacts"

    @property
    def embedded_pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(f.name.upper())
            if raw is None or raw.strip() == "":
                continue
            values[f.name] = _convert(f.name.upper(), str(f.type), raw.strip())
        if "supabase_url" in values and "supabase_service_role_key" not in values:
            raise ConfigError("SUPABASE_SERVICE_ROLE_KEY", "", "is required with SUPABASE_URL")
        settings = cls(**values)  # type: ignore[arg-type]
        settings.validate()
        return settings

    def validate(self) -> None:
        positive = (
            "poll_interval",
            "degraded_poll_interval",
            "heartbeat_interval",
            "progress_interval",
            "checkpoint_interval",
            "stale_after",
            "stop_grace",
            "kill_grace",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(name.upper(), str(getattr(self, name)), "must be > 0")
        for name in ("dataset_cache_max_gb", "min_free_disk_gb"):
            if getattr(self, name) < 0:
                raise ConfigError(name.upper(), str(getattr(self, name)), "must be >= 0")
        if self.max_kept_workspaces < 0:
            raise ConfigError("MAX_KEPT_WORKSPACES", str(self.max_kept_workspaces), "must be >= 0")
        for root in self.allowed_dataset_roots:
            if not root.is_absolute():
                raise ConfigError("ALLOWED_DATASET_ROOTS", str(root), "every folder must be an absolute path")
        if self.dataset_relist_after < 0:
            raise ConfigError("DATASET_RELIST_AFTER", str(self.dataset_relist_after), "must be >= 0")
        for name in ("max_attempts", "download_concurrency", "signed_url_ttl"):
            if getattr(self, name) < 1:
                raise ConfigError(name.upper(), str(getattr(self, name)), "must be >= 1")
        if self.supabase_url:
            try:
                parts = urlsplit(self.supabase_url)
                valid = parts.scheme in ("http", "https") and bool(parts.hostname)
            except ValueError:
                valid = False
            if not valid:
                raise ConfigError(
                    "SUPABASE_URL",
                    self.supabase_url,
                    "must be the project URL, https://<project>.supabase.co",
                )
        if self.agent_secret is not None and len(self.agent_secret) < 16:
            raise ConfigError("AGENT_SECRET", "***", "must be at least 16 characters")
        if self.max_concurrent_runs is not None and self.max_concurrent_runs < 1:
            raise ConfigError("MAX_CONCURRENT_RUNS", str(self.max_concurrent_runs), "must be >= 1")
        if self.metrics_port is not None and not 1 <= self.metrics_port <= 65535:
            raise ConfigError("METRICS_PORT", str(self.metrics_port), "must be a TCP port, 1-65535")
        _ = self.device_list  # raises on a bad DEVICES
        if self.stale_after <= 2 * self.heartbeat_interval:
            raise ConfigError(
                "STALE_AFTER", str(self.stale_after), "must be more than twice HEARTBEAT_INTERVAL"
            )


_CHOICES = {
    "SHUTDOWN_MODE": ("wait", "release"),
    "ARTIFACT_URL_MODE": ("public", "signed"),
}


def _convert(key: str, type_name: str, raw: str) -> object:
    if type_name.startswith("tuple[Path"):
        return tuple(Path(p.strip()).expanduser() for p in raw.split(os.pathsep) if p.strip())
    if type_name.startswith("tuple[str"):
        return tuple(p.strip() for p in raw.split(",") if p.strip())
    if key in _CHOICES:
        if raw.lower() not in _CHOICES[key]:
            raise ConfigError(key, raw, f"must be one of {', '.join(_CHOICES[key])}")
        return raw.lower()
    if "Path" in type_name:
        return Path(raw).expanduser()
    if "bool" in type_name:
        lowered = raw.lower()
        if lowered == "auto" and "None" in type_name:
            return None
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(key, raw, "must be true/false (1/0)")
    if "float" in type_name:
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(key, raw, "must be a number of seconds") from None
    if "int" in type_name:
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(key, raw, "must be a whole number") from None
    return raw


# Names the old saturnos-trainer read that this agent accepts without using.
LEGACY_SETTINGS = ("CANCEL_CHECK_INTERVAL", "TIMESTAMP_STREAMS", "SUPABASE_STORAGE_BUCKET")


def legacy_settings_present(env: Mapping[str, str] | None = None) -> list[str]:
    env = os.environ if env is None else env
    return [k for k in LEGACY_SETTINGS if k in env]


def cuda_visible_devices(env: Mapping[str, str] | None = None) -> tuple[str, ...] | None:
    """The GPUs CUDA_VISIBLE_DEVICES leaves this agent (() when it hides them all); None when unset."""
    env = os.environ if env is None else env
    raw = env.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return None
    items = tuple(d.strip() for d in raw.split(",") if d.strip())
    # CUDA stops at the first invalid entry, "-1" included.
    valid: list[str] = []
    for item in items:
        if not _GPU_ID.match(item):
            break
        valid.append(item)
    return tuple(valid)


# The trainer never talks to the database or Storage: it does not get their credentials.
_CHILD_WITHHELD = (
    "DATABASE_URL",
    "SUPABASE_SERVICE_ROLE_KEY",
    "SUPABASE_URL",
    "TEST_DATABASE_URL",
    "AGENT_SECRET",  # a trainer that could sign checkpoints could forge one
)


def tool_caches(settings: Settings) -> dict[str, Path]:
    """Where matplotlib, Ultralytics and torch hub keep their caches and settings: under DATA_DIR."""
    base = settings.data_dir / "cache"
    return {
        "MPLCONFIGDIR": base / "matplotlib",
        "YOLO_CONFIG_DIR": base / "ultralytics",
        "TORCH_HOME": base / "torch",
    }


def child_environment(settings: Settings, offline: bool) -> dict[str, str]:
    """The environment for a trainer child: the parent's without secrets, plus the offline switches."""
    env = {k: v for k, v in os.environ.items() if k not in _CHILD_WITHHELD}
    # Left to themselves these write under the home folder, outside anything the operator sized.
    env.update({name: str(path) for name, path in tool_caches(settings).items()})
    if offline:
        env.update({"YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "0", "HF_HUB_OFFLINE": "1"})
    env["SATURNOS_OFFLINE"] = "1" if offline else "0"
    return env


def tool_environment() -> dict[str, str]:
    """The environment for host tools the parent runs (nvidia-smi): the C locale, so output parses."""
    return {**os.environ, "LC_ALL": "C"}
