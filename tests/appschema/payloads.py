"""Rows as the SaturnOS web app inserts them, written from its StartTrainingDialog and pages.

The dialog keeps one `config` object; on submit the app inserts `{project_id, step_id, run_name,
base_model, data_yaml, status: 'queued', created_by, configuration: {...config, device}}` where
`device` is 0 for the GPU choice and 'cpu' for the CPU one. Presets merge their values into it.
"""

from __future__ import annotations

import copy
from typing import Any

TRAINING_PRESETS: dict[str, dict[str, Any]] = {
    "balanced": {
        "epochs": 100,
        "batchSize": 16,
        "imgSize": 640,
        "learningRate": 0.001,
        "optimizer": "Adam",
        "compute": "gpu",
    },
    "fast": {
        "epochs": 40,
        "batchSize": 32,
        "imgSize": 640,
        "learningRate": 0.001,
        "optimizer": "Adam",
        "compute": "gpu",
    },
    "high_accuracy": {
        "epochs": 150,
        "batchSize": 16,
        "imgSize": 1280,
        "learningRate": 0.0008,
        "optimizer": "AdamW",
        "compute": "gpu",
    },
    "edge_cpu": {
        "epochs": 60,
        "batchSize": 8,
        "imgSize": 320,
        "learningRate": 0.001,
        "optimizer": "SGD",
        "compute": "cpu",
    },
}

_AUG_KEYS = (
    "hsv_h",
    "hsv_s",
    "hsv_v",
    "degrees",
    "translate",
    "scale",
    "shear",
    "perspective",
    "flipud",
    "fliplr",
    "mosaic",
    "mixup",
    "copy_paste",
)


def _aug(*values: float) -> dict[str, float]:
    return dict(zip(_AUG_KEYS, values, strict=True))


AUGMENTATION_PRESETS: dict[str, dict[str, float] | None] = {
    "none": _aug(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "light": _aug(0.01, 0.4, 0.3, 0, 0.05, 0.3, 0, 0, 0, 0.5, 0.5, 0.0, 0.0),
    "standard": _aug(0.015, 0.7, 0.4, 0, 0.1, 0.5, 0, 0, 0, 0.5, 1.0, 0.0, 0.0),
    "strong": _aug(0.02, 0.8, 0.5, 10, 0.2, 0.8, 2.0, 0.0, 0.0, 0.5, 1.0, 0.2, 0.1),
    "custom": None,  # keeps the current values, labelled 'custom'
}
DEFAULT_AUGMENTATION: dict[str, Any] = {"preset": "standard", **(AUGMENTATION_PRESETS["standard"] or {})}
MODELS = ("YOLOv8s", "YOLOv8n", "YOLOv8m")


def dialog_config(step_title: str = "Inspect_bolt", version: int = 1) -> dict[str, Any]:
    """The dialog's state when it opens: the balanced preset and the standard augmentation."""
    return {
        "runName": f"{step_title}_v{version}",
        "dataYaml": "storage:datasets/p1/s1/data.yaml",
        "baseModel": "YOLOv8s",
        **TRAINING_PRESETS["balanced"],
        "augmentation": copy.deepcopy(DEFAULT_AUGMENTATION),
        "optimizationStrategy": "manual",
        "bayesianConfig": {
            "objective": "maximize_mAP",
            "numTrials": 20,
            "maxDuration": 6,
            "searchSpace": {
                "epochs": {"enabled": False, "min": 50, "max": 200, "type": "integer"},
                "batchSize": {"enabled": False, "options": [8, 16, 32], "type": "categorical"},
                "learningRate": {"enabled": False, "min": 0.0001, "max": 0.01, "type": "log_uniform"},
                "imgSize": {"enabled": False, "options": [320, 640, 1280], "type": "categorical"},
            },
        },
    }


def apply_preset(config: dict[str, Any], name: str) -> dict[str, Any]:
    return {**config, **TRAINING_PRESETS[name]}


def apply_augmentation_preset(config: dict[str, Any], name: str) -> dict[str, Any]:
    current = {**DEFAULT_AUGMENTATION, **config.get("augmentation", {})}
    values = AUGMENTATION_PRESETS[name]
    return {**config, "augmentation": {**current, **(values or {}), "preset": name}}


def edit_augmentation(config: dict[str, Any], key: str, value: float) -> dict[str, Any]:
    """A slider moved: the value is set and the preset becomes 'custom'."""
    current = {**DEFAULT_AUGMENTATION, **config.get("augmentation", {})}
    return {**config, "augmentation": {**current, key: value, "preset": "custom"}}


def configuration(config: dict[str, Any]) -> dict[str, Any]:
    """What the app stores in `configuration`: the dialog's state plus the resolved device."""
    return {**config, "device": "cpu" if config.get("compute") == "cpu" else 0}


def row(config: dict[str, Any], project_id: str | None = None, step_id: str | None = None) -> dict[str, Any]:
    """The inserted row's columns (TrainingConfiguration.handleStartTraining + the dialog's submit)."""
    return {
        "project_id": project_id,
        "step_id": step_id,
        "run_name": config["runName"],
        "base_model": config["baseModel"],
        "data_yaml": config["dataYaml"],
        "status": "queued",
        "created_by": "unknown@local",
        "configuration": configuration(config),
    }


def every_shape() -> dict[str, dict[str, Any]]:
    """Each way the dialog can be submitted: presets crossed with augmentation presets, and edits."""
    shapes: dict[str, dict[str, Any]] = {}
    for preset in TRAINING_PRESETS:
        for aug in AUGMENTATION_PRESETS:
            shapes[f"{preset}-{aug}"] = apply_augmentation_preset(apply_preset(dialog_config(), preset), aug)
    for model in MODELS:
        shapes[f"model-{model}"] = {**dialog_config(), "baseModel": model}
    edited = dialog_config()
    for key, value in (("degrees", 45.0), ("mixup", 0.3), ("fliplr", 0.0), ("copy_paste", 0.25)):
        edited = edit_augmentation(edited, key, value)
    shapes["custom-edited"] = edited
    # parseInt('') is NaN, which JSON.stringify writes as null.
    shapes["cleared-fields"] = {**dialog_config(), "epochs": None, "learningRate": None}
    shapes["bayesian"] = {**dialog_config(), "optimizationStrategy": "bayesian"}
    shapes["no-run-name"] = {**dialog_config(), "runName": ""}
    return shapes
