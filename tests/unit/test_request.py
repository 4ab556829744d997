"""Request parsing: every key of the web app's configuration, its default, and its validation."""

from __future__ import annotations

from typing import Any

import pytest

from agent.config import ConfigError, Settings
from agent.domain.errors import InvalidRequest
from agent.domain.request import model_reference, parse_request
from agent.domain.results import summarize
from agent.domain.run import RunRow
from agent.domain.status import RunStatus, is_claimable


def row(configuration: Any = None, **cols: Any) -> RunRow:
    cols.setdefault("data_yaml", "/data/d.yaml")
    return RunRow(id="r1", status=RunStatus.QUEUED, configuration=configuration, **cols)


def test_defaults_are_the_old_scripts() -> None:
    req = parse_request(row())
    assert (req.base_model, req.epochs, req.batch, req.imgsz, req.lr0, req.optimizer, req.device) == (
        "YOLOv8s",
        100,
        16,
        640,
        0.001,
        "Adam",
        "0",
    )
    assert req.task is None and req.pretrained and req.trainer == "ultralytics"


def test_camel_case_keys_and_json_string_configuration() -> None:
    cfg = (
        '{"dataYaml": "x.yaml", "modelTask": "segmentation", "epochs": "12", "batchSize": -1,'
        ' "imgSize": 320, "learningRate": 0.01, "optimizer": "sgd", "device": "cpu",'
        ' "augmentation": {"fliplr": 0.5, "mosaic": 0}}'
    )
    req = parse_request(row(cfg, data_yaml=None, base_model="yolov8n"))
    assert req.data_yaml == "x.yaml" and req.task == "segment" and req.epochs == 12 and req.batch == -1
    assert (req.imgsz, req.lr0, req.optimizer, req.device) == (320, 0.01, "SGD", "cpu")
    assert req.augmentation == {"fliplr": 0.5, "mosaic": 0.0}


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ("{epochs: 3", "configuration"),
        ("[1, 2]", "configuration"),
        ({"epochs": -3}, "epochs"),
        ({"epochs": "many"}, "epochs"),
        ({"epochs": 2.5}, "epochs"),
        ({"epochs": True}, "epochs"),
        ({"batchSize": 0}, "batchSize"),
        ({"imgSize": 8}, "imgSize"),
        ({"learningRate": 0}, "learningRate"),
        ({"optimizer": "Adagrad"}, "optimizer"),
        ({"device": "gpu7"}, "device"),
        ({"task": "classify"}, "task"),
        ({"augmentation": {"fliplr": 2}}, "augmentation.fliplr"),
        ({"augmentation": {"blur": 0.1, "mosaic": -1}}, "augmentation.mosaic"),
        ({"pretrained": "yes please"}, "pretrained"),
    ],
)
def test_a_bad_value_names_its_key(config: Any, key: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        parse_request(row(config))
    assert err.value.key == key
    assert key in str(err.value)


def test_missing_data_yaml_and_unknown_model() -> None:
    with pytest.raises(InvalidRequest, match="data_yaml"):
        parse_request(row(data_yaml=None))
    with pytest.raises(InvalidRequest, match="base_model"):
        parse_request(row(base_model="resnet50"))


def test_image_size_not_a_multiple_of_32_is_noted() -> None:
    assert "rounds it up to 128" in parse_request(row({"imgSize": 100})).notes[0]


def test_model_reference_by_task_and_pretrained() -> None:
    assert model_reference("YOLOv8n", "detect", True) == "yolov8n.pt"
    assert model_reference("YOLOv8m", "segment", True) == "yolov8m-seg.pt"
    assert model_reference("YOLOv8s", "segment", False) == "yolov8s-seg.yaml"
    assert model_reference("/w/custom.pt", "detect", True) == "/w/custom.pt"


def test_summary_uses_mask_metrics_for_segment() -> None:
    metrics = {
        "metrics/mAP50-95(B)": 0.4,
        "metrics/mAP50-95(M)": 0.3,
        "metrics/precision(M)": 0.9,
        "metrics/recall(B)": 0.7,
        "metrics/mAP50(M)": 0.5,
    }
    seg = summarize("segment", metrics)
    assert (seg["mAP"], seg["precision"], seg["recall"], seg["mAP50"]) == (0.3, 0.9, 0.7, 0.5)
    assert summarize("detect", {"metrics/mAP50(B)": 0.6})["mAP"] == 0.6


def test_claimable_predicate_is_the_old_scripts() -> None:
    assert is_claimable("queued", None, None, False)
    assert is_claimable("running", None, None, None)
    assert not is_claimable("running", "2026-01-01", None, False)
    assert not is_claimable("queued", None, "w", False)
    assert not is_claimable("queued", None, None, True)
    assert not is_claimable("completed", None, None, False)


def test_settings_are_validated_with_the_name_of_the_setting() -> None:
    assert Settings.from_env({"POLL_INTERVAL": "5", "SHUTDOWN_MODE": "Release"}).shutdown_mode == "release"
    for env, key in [
        ({"POLL_INTERVAL": "soon"}, "POLL_INTERVAL"),
        ({"SHUTDOWN_MODE": "later"}, "SHUTDOWN_MODE"),
        ({"SUPABASE_URL": "http://x"}, "SUPABASE_SERVICE_ROLE_KEY"),
        ({"HEARTBEAT_INTERVAL": "100"}, "STALE_AFTER"),
        ({"MAX_CONCURRENT_RUNS": "0"}, "MAX_CONCURRENT_RUNS"),
    ]:
        with pytest.raises(ConfigError) as err:
            Settings.from_env(env)
        assert err.value.key == key
