"""Which model the child should build: a model yaml, a local weights file, or a name to download.

Runs in the parent before the child starts, so an offline host without the weights fails the
run at once with a clear message instead of ultralytics trying (and hanging on) a download.
"""

from __future__ import annotations

import json
from pathlib import Path

from agent.domain.errors import WeightsError
from agent.domain.request import Task, TrainingRequest, model_reference

_YAML_SUFFIXES = (".yaml", ".yml")


def resolve_model(request: TrainingRequest, task: Task, weights_dir: Path | None, offline: bool) -> str:
    """A reference for `YOLO(...)`; raises WeightsError when weights are missing and not downloadable."""
    # The result is an absolute path, the name of a yaml ultralytics ships, or (online) a bare
    # weights name that ultralytics downloads.
    ref = model_reference(request.base_model, task, request.pretrained)
    path = Path(ref).expanduser()
    if ref.lower().endswith(_YAML_SUFFIXES):
        # A bare name such as 'yolov8n.yaml' is one of the yamls ultralytics ships; keep it as is
        # unless a file of that name is at hand. The child runs in the workspace, so paths go absolute.
        for candidate in _candidates(path, weights_dir):
            if candidate.is_file():
                return str(candidate.resolve())
        if len(path.parts) > 1 or path.is_absolute():
            raise WeightsError(f"Model file {ref!r} not found.")
        return ref
    searched = _candidates(path, weights_dir)
    for candidate in searched:
        if candidate.is_file():
            return str(candidate.resolve())
    downloadable = not path.is_absolute() and len(path.parts) == 1
    if downloadable and not offline:
        # Ultralytics knows where to download its own weights from; given a path in WEIGHTS_DIR it
        # saves them there, so the next run on this host finds them instead of downloading again.
        if weights_dir is not None and weights_dir.expanduser().is_dir():
            return str((weights_dir.expanduser() / path).resolve())
        return ref
    places = ", ".join(str(p.parent) for p in searched) or "nowhere"
    where = f"WEIGHTS_DIR ({weights_dir})" if weights_dir is not None else "WEIGHTS_DIR (not set)"
    if downloadable:
        raise WeightsError(
            f"Base model weights {ref!r} are not available: not found in {where} or in {places}, "
            f"and this host is offline so they cannot be downloaded. Put {ref} into WEIGHTS_DIR, "
            'or train from scratch: `saturnos-agent submit --scratch`, or "pretrained": false in the '
            "configuration."
        )
    raise WeightsError(
        f"Base model weights {ref!r} not found (looked in {places}). Check the path or WEIGHTS_DIR, "
        'or train from scratch: `saturnos-agent submit --scratch`, or "pretrained": false in the '
        "configuration."
    )


def _candidates(path: Path, weights_dir: Path | None) -> list[Path]:
    if path.is_absolute():
        return [path]
    found: list[Path] = []
    if weights_dir is not None:
        found.append(weights_dir.expanduser() / path)
    found.append(Path.cwd() / path)
    settings_dir = _ultralytics_weights_dir()
    if settings_dir is not None:
        found.append(settings_dir / path)
    unique: list[Path] = []
    for p in found:
        if p not in unique:
            unique.append(p)
    return unique


def _ultralytics_weights_dir() -> Path | None:
    """`weights_dir` from ultralytics' default settings file, read without importing ultralytics."""
    settings = Path.home() / ".config" / "Ultralytics" / "settings.json"
    try:
        value = json.loads(settings.read_text()).get("weights_dir")
    except (OSError, ValueError, AttributeError):
        return None
    return Path(value).expanduser() if isinstance(value, str) and value else None
