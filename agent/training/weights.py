"""Which model the child should build: a known model, or a model file from WEIGHTS_DIR.

Runs in the parent before the child starts, so an offline host without the weights fails the
run at once with a clear message instead of ultralytics trying (and hanging on) a download.

Trust: ultralytics unpickles `.pt` files and evaluates strings in model YAMLs (`parse_model`),
so a model may only come from a trusted place. `base_model` is the row's, hence untrusted;
request.py allows only a known name or a plain file name, and this module resolves a file name
only inside WEIGHTS_DIR, the operator's folder. A file the agent itself downloaded for a run (a
dataset, a listing) is never a model. Known names resolve to ultralytics' own weights (its
release downloads, into WEIGHTS_DIR) or, from scratch, to the model YAMLs packaged with it.
"""

from __future__ import annotations

import json
from pathlib import Path

from agent.domain.errors import ModelNotFound, WeightsError
from agent.domain.redact import quote
from agent.domain.request import Task, TrainingRequest, is_hub_weights, is_model_yaml, model_reference


def resolve_model(
    request: TrainingRequest,
    task: Task,
    weights_dir: Path | None,
    offline: bool,
    *,
    allow_model_yaml: bool = False,
) -> str:
    """A reference for `YOLO(...)`; raises WeightsError when the model is refused or unavailable.

    The result is an absolute path inside WEIGHTS_DIR, the bare name of a YAML ultralytics ships,
    or (online, no WEIGHTS_DIR) the bare name of weights ultralytics downloads from its releases.
    """
    ref = model_reference(request.base_model, task, request.pretrained)
    hub = is_hub_weights(ref)
    if is_model_yaml(ref):
        if hub:
            return ref  # packaged with ultralytics: trusted; yolo.py makes sure it is that file
        if not allow_model_yaml:
            raise WeightsError(
                f"Model YAML {quote(ref)} refused: model YAMLs from runs are not accepted on this agent "
                "(ALLOW_ROW_MODEL_YAML). Use a known model name, or weights in WEIGHTS_DIR."
            )
    found = _in_weights_dir(ref, weights_dir)
    if found is not None:
        return str(found)
    settings_dir = _ultralytics_weights_dir() if hub else None
    if settings_dir is not None and (settings_dir / ref).is_file():
        return str((settings_dir / ref).resolve())
    if hub and not offline:
        # Ultralytics downloads its own weights; given a path in WEIGHTS_DIR it saves them there,
        # so the next run on this host finds them instead of downloading again.
        if weights_dir is not None and weights_dir.expanduser().is_dir():
            return str((weights_dir.expanduser() / ref).resolve())
        return ref
    where = f"WEIGHTS_DIR ({weights_dir})" if weights_dir is not None else "WEIGHTS_DIR (not set)"
    if hub:
        raise WeightsError(
            f"Base model weights {quote(ref)} are not available: not found in {where}, and this host "
            f"is offline so they cannot be downloaded. Put {ref} into WEIGHTS_DIR, "
            'or train from scratch: `saturnos-agent submit --scratch`, or "pretrained": false in the '
            "configuration."
        )
    raise ModelNotFound(f"Model file {quote(ref)} not found in {where}.")


def _in_weights_dir(name: str, weights_dir: Path | None) -> Path | None:
    """`weights_dir / name` when it is a file there; `name` is a plain file name (request.py)."""
    if weights_dir is None or Path(name).name != name or name in ("", ".", ".."):
        return None
    root = weights_dir.expanduser()
    candidate = root / name
    # Links inside WEIGHTS_DIR are the operator's own choice, so they are followed.
    return candidate.resolve() if candidate.is_file() else None


def _ultralytics_weights_dir() -> Path | None:
    """`weights_dir` from ultralytics' default settings file, read without importing ultralytics."""
    settings = Path.home() / ".config" / "Ultralytics" / "settings.json"
    try:
        value = json.loads(settings.read_text()).get("weights_dir")
    except (OSError, ValueError, AttributeError):
        return None
    return Path(value).expanduser() if isinstance(value, str) and value else None
