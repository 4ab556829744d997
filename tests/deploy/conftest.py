"""Shared helpers of the deploy checks: the repository's deploy files, parsed."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from agent.config import Settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
UNITS = (DEPLOY / "systemd" / "saturnos-agent.service", DEPLOY / "systemd" / "saturnos-agent@.service")

# Settings the deploy files set that land with the GPU slots and metrics work (DEVICES,
# METRICS_PORT); remove each from here once it is a field of Settings.
PENDING_SETTINGS = frozenset({"DEVICES", "METRICS_PORT"})
# Process environment that is not a setting of the agent.
PROCESS_ENV = frozenset({"HOME", "PATH", "PYTHONUNBUFFERED", "CUDA_VISIBLE_DEVICES"})


def setting_names() -> frozenset[str]:
    return frozenset(f.name.upper() for f in fields(Settings)) | PENDING_SETTINGS


def unit_sections(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit file as {section: [(key, value), ...]}, continuation lines joined."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: str | None = None
    pending = ""
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = pending + raw.strip() if pending else raw.strip()
        pending = ""
        if not line or line.startswith(("#", ";")):
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        header = re.fullmatch(r"\[([A-Za-z]+)\]", line)
        if header:
            current = header.group(1)
            assert current not in sections, f"{path.name}:{number}: section [{current}] twice"
            sections[current] = []
            continue
        assert current is not None, f"{path.name}:{number}: a setting outside any section"
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", key.strip()), f"{path.name}:{number}: {line!r}"
        sections[current].append((key.strip(), value.strip()))
    assert not pending, f"{path.name}: ends with a continuation"
    return sections


def unit_value(sections: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in sections.get(section, []) if k == key]
