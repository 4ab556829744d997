"""Every configuration the web app can write parses, and maps to arguments ultralytics accepts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.domain.errors import InvalidRequest
from agent.domain.request import KNOWN_KEYS, parse_request
from agent.domain.run import RunRow
from agent.domain.status import RunStatus
from agent.ports import PreparedDataset, TrainJob
from agent.training.yolo import train_arguments
from tests.appschema import payloads

SHAPES = payloads.every_shape()


def app_row(config: dict[str, Any]) -> RunRow:
    cols = payloads.row(config)
    return RunRow(
        id="r1",
        status=RunStatus.QUEUED,
        data_yaml=cols["data_yaml"],
        base_model=cols["base_model"],
        configuration=cols["configuration"],
    )


@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_dialog_shape_parses_with_its_values(shape: str) -> None:
    config = SHAPES[shape]
    req = parse_request(app_row(config))
    assert req.base_model == config["baseModel"]
    assert req.epochs == (config["epochs"] or 100)
    assert (req.batch, req.imgsz, req.optimizer) == (
        config["batchSize"],
        config["imgSize"],
        config["optimizer"],
    )
    assert req.lr0 == (config["learningRate"] or 0.001)
    assert req.device == ("cpu" if config["compute"] == "cpu" else "0")
    expected = {k: float(v) for k, v in config["augmentation"].items() if k != "preset"}
    assert dict(req.augmentation) == expected
    # The app's own keys are known, not noise: only a non-manual search strategy is worth a note.
    assert [n for n in req.notes if "ignored" in n] == (
        ["optimizationStrategy='bayesian' ignored: the run trains once with the values given"]
        if shape == "bayesian"
        else []
    )


def test_the_preset_label_alone_and_a_custom_preset_parse() -> None:
    for preset in ("standard", "custom", "none", "something-newer"):
        req = parse_request(app_row({**payloads.dialog_config(), "augmentation": {"preset": preset}}))
        assert dict(req.augmentation) == {}
        assert req.notes == ()


def test_unknown_keys_are_ignored_with_a_note_and_known_keys_stay_validated() -> None:
    config = {
        **payloads.dialog_config(),
        "newAppSetting": {"x": 1},
        "augmentation": {**payloads.DEFAULT_AUGMENTATION, "blur": 0.1, "grayscale": None},
    }
    req = parse_request(app_row(config))
    assert "blur" not in req.augmentation and req.augmentation["mosaic"] == 1.0
    assert "augmentation.blur ignored: not an augmentation setting" in req.notes
    assert "augmentation.grayscale ignored: not an augmentation setting" in req.notes
    assert "configuration.newAppSetting ignored: not a training setting" in req.notes

    for bad, key in [
        ({"augmentation": {"preset": "custom", "fliplr": 2}}, "augmentation.fliplr"),
        ({"augmentation": {"preset": "custom", "degrees": "lots"}}, "augmentation.degrees"),
        ({"augmentation": "{not json"}, "augmentation"),
        ({"augmentation": [0.5]}, "augmentation"),
        ({"augmentation": None, "hsv_h": 3}, "hsv_h"),
    ]:
        with pytest.raises(InvalidRequest) as err:
            parse_request(app_row({**payloads.dialog_config(), **bad}))
        assert err.value.key == key


def test_ignored_key_notes_are_bounded() -> None:
    config = {**payloads.dialog_config(), **{f"k{i}": i for i in range(500)}}
    notes = parse_request(app_row(config)).notes
    assert len(notes) == 21 and notes[-1] == "480 more keys ignored: not a training setting"


def test_augmentation_as_a_json_string_and_at_the_top_level_as_the_old_script_read_them() -> None:
    req = parse_request(
        app_row({**payloads.dialog_config(), "augmentation": '{"preset": "x", "mixup": 0.2}'})
    )
    assert dict(req.augmentation) == {"mixup": 0.2}
    req = parse_request(
        app_row({**payloads.dialog_config(), "augmentation": {"mixup": 0.2}, "mixup": 0.9, "degrees": 5})
    )
    assert dict(req.augmentation) == {"mixup": 0.2, "degrees": 5.0}


def test_every_key_the_parser_reads_is_known() -> None:
    config: dict[str, Any] = {key: None for key in KNOWN_KEYS}
    config.update(dataYaml="d.yaml", trainer="fake", optimizer="Adam")
    assert parse_request(RunRow(id="r1", status=RunStatus.QUEUED, configuration=config)).notes == ()


@pytest.mark.parametrize("shape", list(SHAPES))
def test_ultralytics_accepts_the_training_arguments(
    shape: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path / "yolo"))
    from ultralytics.cfg import DEFAULT_CFG, get_cfg

    req = parse_request(app_row(SHAPES[shape]))
    dataset = PreparedDataset(yaml_path=tmp_path / "data.yaml", task="detect", summary={})
    job = TrainJob("r1", 1, req, tmp_path, dataset, "yolov8s.pt")
    device = "cpu" if req.device == "cpu" else "0"
    # get_cfg raises on an argument ultralytics does not know or a value out of its range.
    cfg = get_cfg(DEFAULT_CFG, train_arguments(job, device))
    for key, value in req.augmentation.items():
        assert getattr(cfg, key) == value
    assert (cfg.epochs, cfg.batch, cfg.imgsz, cfg.optimizer) == (
        req.epochs,
        req.batch,
        req.imgsz,
        req.optimizer,
    )
