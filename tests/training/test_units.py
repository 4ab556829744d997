"""Pure parts of the training package: job file, model resolution, device choice, arguments."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.domain.errors import ModelNotFound, WeightsError
from agent.domain.request import FakeOptions
from agent.ports import PreparedDataset
from agent.training.jobfile import read_job, write_job
from agent.training.weights import resolve_model
from agent.training.yolo import FONT_NAMES, pick_device, prepare_offline, train_arguments
from tests.training import helpers


def test_job_file_round_trip(tmp_path: Path) -> None:
    dataset = PreparedDataset(yaml_path=tmp_path / "data.yaml", task="segment", summary={"images": 3})
    job = helpers.job(
        tmp_path,
        dataset,
        augmentation={"fliplr": 0.5, "mosaic": 0.0},
        fake=FakeOptions(epoch_seconds=1.5, batches=7, crash_at_epoch=2),
        notes=("imgSize rounded",),
        device="0,1",
        seed=3,
        resume_from=tmp_path / "last.pt",
    )
    read = read_job(write_job(job, offline=True))
    assert read.offline is True
    assert read.job == job


def test_yaml_models_pass_through(tmp_path: Path) -> None:
    req = helpers.request(base_model="YOLOv8s", pretrained=False)
    assert resolve_model(req, "detect", tmp_path, offline=True) == "yolov8s.yaml"
    assert resolve_model(req, "segment", None, offline=True) == "yolov8s-seg.yaml"


def test_weights_are_found_in_weights_dir_first(tmp_path: Path) -> None:
    (tmp_path / "yolov8n-seg.pt").write_bytes(b"weights")
    req = helpers.request(base_model="YOLOv8n", pretrained=True)
    assert resolve_model(req, "segment", tmp_path, offline=True) == str(tmp_path / "yolov8n-seg.pt")


def test_a_model_file_name_is_resolved_only_inside_weights_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "mine.pt").write_bytes(b"weights")
    (tmp_path / "elsewhere.pt").write_bytes(b"not the operator's")
    monkeypatch.chdir(tmp_path)
    assert resolve_model(helpers.request(base_model="mine.pt"), "detect", weights, offline=True) == str(
        weights / "mine.pt"
    )
    # A file in the working directory is not a model, whatever its name.
    with pytest.raises(ModelNotFound, match="WEIGHTS_DIR"):
        resolve_model(helpers.request(base_model="elsewhere.pt"), "detect", weights, offline=False)


def test_model_yamls_are_refused_unless_the_operator_allows_them(tmp_path: Path) -> None:
    (tmp_path / "custom.yaml").write_text("nc: 1\n")
    req = helpers.request(base_model="custom.yaml")
    with pytest.raises(WeightsError, match="ALLOW_ROW_MODEL_YAML"):
        resolve_model(req, "detect", tmp_path, offline=True)
    allowed = resolve_model(req, "detect", tmp_path, offline=True, allow_model_yaml=True)
    assert allowed == str(tmp_path / "custom.yaml")
    # The packaged YAML of a known model stays usable: `pretrained: false`.
    scratch = helpers.request(base_model="YOLO11s", pretrained=False)
    assert resolve_model(scratch, "segment", tmp_path, offline=True) == "yolo11s-seg.yaml"


def test_missing_weights_offline_fail_clearly(tmp_path: Path) -> None:
    req = helpers.request(base_model="YOLOv8m", pretrained=True)
    with pytest.raises(WeightsError) as err:
        resolve_model(req, "detect", tmp_path / "weights", offline=True)
    message = str(err.value)
    assert "yolov8m.pt" in message
    assert "WEIGHTS_DIR" in message and str(tmp_path / "weights") in message
    assert "pretrained" in message and "offline" in message


def test_missing_weights_online_are_left_to_download(tmp_path: Path) -> None:
    req = helpers.request(base_model="YOLOv8m", pretrained=True)
    assert resolve_model(req, "detect", None, offline=False) == "yolov8m.pt"
    # With WEIGHTS_DIR, ultralytics is given a path there, so the download is kept for later runs.
    assert resolve_model(req, "detect", tmp_path, offline=False) == str(tmp_path.resolve() / "yolov8m.pt")


def test_a_missing_weights_file_fails_even_online(tmp_path: Path) -> None:
    req = helpers.request(base_model="nope.pt")
    with pytest.raises(ModelNotFound, match=r"nope\.pt"):
        resolve_model(req, "detect", None, offline=False)


@pytest.mark.parametrize(
    ("requested", "cuda", "device", "noted"),
    [
        (None, True, "0", False),
        (None, False, "cpu", True),
        ("0", False, "cpu", True),
        ("cuda:1", False, "cpu", True),
        ("0,1", True, "0,1", False),
        ("cpu", True, "cpu", False),
    ],
)
def test_pick_device(requested: str | None, cuda: bool, device: str, noted: bool) -> None:
    chosen, note = pick_device(requested, cuda)
    assert chosen == device
    assert bool(note) == noted


def test_train_arguments(tmp_path: Path) -> None:
    dataset = PreparedDataset(yaml_path=tmp_path / "data.yaml", task="detect", summary={})
    job = helpers.job(tmp_path, dataset, trainer="ultralytics", augmentation={"mosaic": 0.0}, patience=5)
    args = train_arguments(job, "cpu")
    assert args["data"] == str(tmp_path / "data.yaml")
    assert args["project"] == str(tmp_path) and args["name"] == "train" and args["exist_ok"] is True
    assert args["workers"] == 0  # no forked workers on the CPU
    assert args["mosaic"] == 0.0 and args["patience"] == 5
    assert "resume" not in args and "seed" not in args

    checkpoint = tmp_path / "last.pt"
    resumed = helpers.job(tmp_path, dataset, trainer="ultralytics", resume_from=checkpoint, workers=2)
    args = train_arguments(resumed, "0")
    assert args["resume"] == str(tmp_path / "last.pt")
    assert args["save_dir"] == str(tmp_path / "train")
    assert args["workers"] == 2


def test_prepare_offline_seeds_fonts(tmp_path: Path) -> None:
    env: dict[str, str] = {}
    config = prepare_offline(tmp_path, env)
    assert env["YOLO_OFFLINE"] == "1" and env["YOLO_AUTOINSTALL"] == "0"
    assert config == Path(env["YOLO_CONFIG_DIR"]) / "Ultralytics"
    for name in FONT_NAMES:
        assert (config / name).stat().st_size > 100_000


def test_parent_modules_and_fake_child_do_not_import_heavy_libraries() -> None:
    code = (
        "import sys\n"
        "import agent.training.parent, agent.training.weights, agent.training.procgroup\n"
        "import agent.training.child, agent.training.fake, agent.training.yolo\n"
        "heavy = sorted(m for m in ('torch', 'ultralytics', 'numpy', 'cv2') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
