"""This host's hardware for the worker registry, read without importing torch into the parent."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from agent.config import tool_environment


@dataclass(frozen=True, slots=True)
class Hardware:
    gpus: tuple[str, ...] = ()
    gpu_memory_gb: float | None = None  # of the first GPU
    cpu_model: str | None = None
    ram_gb: float | None = None


def detect_hardware() -> Hardware:
    """GPUs from nvidia-smi when it is installed, CPU and memory from /proc; None for what is unknown."""
    gpus = parse_nvidia_smi(_nvidia_smi())
    return Hardware(
        gpus=tuple(name for name, _ in gpus),
        gpu_memory_gb=gpus[0][1] if gpus else None,
        cpu_model=parse_cpuinfo(_read("/proc/cpuinfo")),
        ram_gb=parse_meminfo(_read("/proc/meminfo")),
    )


def parse_nvidia_smi(out: str) -> list[tuple[str, float | None]]:
    """`name, memory.total` CSV lines (MiB, no units) as (name, GB) pairs."""
    gpus: list[tuple[str, float | None]] = []
    for line in out.splitlines():
        name, _, memory = line.rpartition(",")
        if not name:
            name, memory = memory, ""
        if not name.strip():
            continue
        try:
            gb: float | None = round(float(memory.strip()) / 1024, 1)
        except ValueError:
            gb = None
        gpus.append((name.strip(), gb))
    return gpus


def parse_cpuinfo(text: str) -> str | None:
    """The CPU's model name (x86 `model name`; ARM kernels name it differently or not at all)."""
    for key in ("model name", "Model", "cpu model", "Hardware"):
        for line in text.splitlines():
            name, sep, value = line.partition(":")
            if sep and name.strip() == key and value.strip():
                return " ".join(value.split())
    return None


def parse_meminfo(text: str) -> float | None:
    """MemTotal in GB."""
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return round(int(parts[1]) / 1024**2, 1)
    return None


def nvidia_smi(args: Iterable[str], timeout: float = 5) -> subprocess.CompletedProcess[str] | None:
    """nvidia-smi with `args`; None when it is not installed, returncode 1 when it cannot run."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        return subprocess.run(
            [exe, *args], capture_output=True, text=True, timeout=timeout, check=False, env=tool_environment()
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return subprocess.CompletedProcess([exe], 1, "", str(exc))


def _nvidia_smi() -> str:
    out = nvidia_smi(["--query-gpu=name,memory.total", "--format=csv,noheader,nounits"])
    return out.stdout if out is not None and out.returncode == 0 else ""


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""
