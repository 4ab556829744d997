from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from loguru import logger

import agent.datasets.workspace as workspace_module
from agent.datasets import DatasetPreparer
from agent.domain.errors import DatasetError
from tests.datasets.conftest import JPEG, basic_dataset, data_yaml, jpeg, request, snapshot, write_tree

Preparers = Callable[..., DatasetPreparer]


async def test_local_dataset_end_to_end(tmp_path: Path, preparer_for: Preparers) -> None:
    src = tmp_path / "user" / "proj"
    yaml_path = basic_dataset(src, download="bash evil.sh", nc=2)
    before = snapshot(src)

    prepared = await preparer_for().prepare(request(str(yaml_path), task="detect"), "run-1", tmp_path / "ws")

    assert snapshot(src) == before  # bytes and mtimes of every file and folder
    ds = tmp_path / "ws" / "dataset"
    assert prepared.yaml_path == ds / "data.yaml"
    assert prepared.task == "detect"
    doc = yaml.safe_load(prepared.yaml_path.read_text())
    assert doc == {
        "path": str(ds),
        "train": "images/train",
        "val": "images/val",
        "names": ["cat", "dog"],
        "nc": 2,
    }
    for rel in (
        "images/train/a.jpg",
        "images/train/b.jpg",
        "images/train/background.jpg",
        "images/val/c.jpg",
    ):
        assert os.path.samefile(ds / rel, src / rel), rel  # hard links
    assert (ds / "labels/train/a.txt").read_text() == "0 0.5 0.5 0.2 0.2\n"
    assert (ds / "labels/train/b.txt").read_text() == "1 0.25 0.3 0.3 0.4\n"  # polygon → box
    assert not (ds / "labels/train/background.txt").exists()
    assert os.stat(ds / "labels/train/a.txt").st_ino != os.stat(src / "labels/train/a.txt").st_ino
    summary = dict(prepared.summary)
    assert summary["images"] == 4
    assert summary["labels"] == 3
    assert summary["instances"] == 3
    assert summary["converted"] == 1
    assert summary["dropped"] == 0
    assert summary["background"] == 1
    assert summary["linked"] == 4


async def test_counts_are_logged_with_bound_fields(tmp_path: Path, preparer_for: Preparers) -> None:
    records: list[Any] = []
    sink = logger.add(lambda m: records.append(m.record), level="DEBUG", diagnose=False)
    try:
        yaml_path = basic_dataset(tmp_path / "proj")
        await preparer_for().prepare(request(str(yaml_path)), "run-7", tmp_path / "ws")
    finally:
        logger.remove(sink)
    normalized = next(r for r in records if r["message"] == "labels normalized")
    extra = normalized["extra"]
    assert (extra["run_id"], extra["source"]) == ("run-7", str(yaml_path))
    assert (extra["kept"], extra["converted"], extra["dropped"], extra["task"]) == (3, 1, 0, "detect")


async def test_segment_task_turns_boxes_into_polygons(tmp_path: Path, preparer_for: Preparers) -> None:
    yaml_path = basic_dataset(tmp_path / "proj")
    prepared = await preparer_for().prepare(request(str(yaml_path), task="segment"), "r", tmp_path / "ws")
    ds = tmp_path / "ws" / "dataset"
    assert prepared.task == "segment"
    assert (ds / "labels/train/a.txt").read_text() == "0 0.4 0.4 0.6 0.4 0.6 0.6 0.4 0.6\n"
    assert (ds / "labels/train/b.txt").read_text() == "1 0.1 0.1 0.4 0.1 0.4 0.5\n"
    assert prepared.summary["converted"] == 2


@pytest.mark.parametrize(
    ("labels", "task"),
    [
        ({"a": "0 0.1 0.1 0.5 0.1 0.5 0.5", "c": "1 0.2 0.2 0.6 0.2 0.4 0.7"}, "segment"),
        ({"a": "0 0.1 0.1 0.5 0.1 0.5 0.5", "c": "1 0.5 0.5 0.2 0.2"}, "detect"),
        ({"a": "0 0.5 0.5 0.2 0.2", "c": "1 0.5 0.5 0.2 0.2"}, "detect"),
    ],
)
async def test_task_inferred_from_labels(
    tmp_path: Path, preparer_for: Preparers, labels: dict[str, str], task: str
) -> None:
    src = tmp_path / "proj"
    write_tree(
        src,
        {
            "images/train/a.jpg": JPEG,
            "images/val/c.jpg": JPEG,
            "labels/train/a.txt": labels["a"],
            "labels/val/c.txt": labels["c"],
            "data.yaml": data_yaml(train="images/train", val="images/val"),
        },
    )
    prepared = await preparer_for().prepare(request(str(src / "data.yaml")), "r", tmp_path / "ws")
    assert prepared.task == task


async def test_relative_to_dataset_root(tmp_path: Path, preparer_for: Preparers) -> None:
    basic_dataset(tmp_path / "root" / "proj")
    prepared = await preparer_for(tmp_path / "root").prepare(request("proj/data.yaml"), "r", tmp_path / "ws")
    assert prepared.summary["images"] == 4


async def test_yaml_path_into_dataset_root_is_allowed(tmp_path: Path, preparer_for: Preparers) -> None:
    root = tmp_path / "root"
    basic_dataset(root / "proj")
    write_tree(
        root / "configs", {"proj.yaml": data_yaml(path="../proj", train="images/train", val="images/val")}
    )
    prepared = await preparer_for(root).prepare(request("configs/proj.yaml"), "r", tmp_path / "ws")
    assert prepared.summary["images"] == 4


@pytest.mark.parametrize("path", ["/home/someone/exported/proj", "C:\\Users\\someone\\proj"])
async def test_stale_absolute_path_from_another_machine_falls_back_to_the_yaml_folder(
    tmp_path: Path, preparer_for: Preparers, path: str
) -> None:
    yaml_path = basic_dataset(tmp_path / "proj", path=path)
    prepared = await preparer_for().prepare(request(str(yaml_path)), "r", tmp_path / "ws")
    assert prepared.summary["images"] == 4


@pytest.mark.parametrize("path", ["/etc", "../../outside", ".."])
async def test_yaml_path_outside_the_dataset_is_rejected(
    tmp_path: Path, preparer_for: Preparers, path: str
) -> None:
    (tmp_path / "outside").mkdir()
    yaml_path = basic_dataset(tmp_path / "a" / "proj", path=path)
    with pytest.raises(DatasetError, match="points outside the dataset folder"):
        await preparer_for().prepare(request(str(yaml_path)), "r", tmp_path / "ws")


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ("/etc", "points outside the dataset folder"),
        ("../../../../etc", "points outside the dataset folder"),
        ("images/nope", "not found"),
    ],
)
async def test_split_entries_stay_inside(
    tmp_path: Path, preparer_for: Preparers, train: str, message: str
) -> None:
    yaml_path = basic_dataset(tmp_path / "proj", train=train)
    with pytest.raises(DatasetError, match=message):
        await preparer_for().prepare(request(str(yaml_path)), "r", tmp_path / "ws")


async def test_list_file_splits(tmp_path: Path, preparer_for: Preparers) -> None:
    src = tmp_path / "proj"
    basic_dataset(src, train="lists/train.txt", val=["val.txt"])
    write_tree(
        src,
        {
            "lists/train.txt": (
                "../images/train/a.jpg\n# a comment\n\n../images/train/b.jpg\n../images/train/gone.jpg\n"
            ),
            "val.txt": "./images/val/c.jpg\n",
        },
    )
    prepared = await preparer_for().prepare(request(str(src / "data.yaml")), "r", tmp_path / "ws")
    ds = tmp_path / "ws" / "dataset"
    doc = yaml.safe_load(prepared.yaml_path.read_text())
    assert doc["train"] == ".splits/train.txt"
    assert (ds / doc["train"]).read_text().splitlines() == [
        str(ds / "images/train/a.jpg"),
        str(ds / "images/train/b.jpg"),
    ]
    assert (ds / doc["val"]).read_text().splitlines() == [str(ds / "images/val/c.jpg")]
    assert prepared.summary["missing_images"] == 1
    assert prepared.summary["images"] == 3


async def test_list_line_escaping_the_dataset_is_rejected(tmp_path: Path, preparer_for: Preparers) -> None:
    src = tmp_path / "proj"
    basic_dataset(src, train="train.txt")
    write_tree(src, {"train.txt": "./images/train/a.jpg\n../../secret.jpg\n"})
    with pytest.raises(DatasetError, match="outside the dataset folder"):
        await preparer_for().prepare(request(str(src / "data.yaml")), "r", tmp_path / "ws")


async def test_roboflow_layout(tmp_path: Path, preparer_for: Preparers) -> None:
    src = tmp_path / "export"
    write_tree(
        src,
        {
            "train/images/a.jpg": JPEG,
            "train/labels/a.txt": "0 0.5 0.5 0.2 0.2\n",
            "valid/images/b.jpg": JPEG,
            "valid/labels/b.txt": "0 0.5 0.5 0.2 0.2\n",
            "data.yaml": data_yaml(train="../train/images", val="../valid/images", nc=2),
        },
    )
    prepared = await preparer_for().prepare(request(str(src / "data.yaml")), "r", tmp_path / "ws")
    doc = yaml.safe_load(prepared.yaml_path.read_text())
    assert (doc["train"], doc["val"]) == ("train/images", "valid/images")
    assert prepared.summary["instances"] == 2


async def test_missing_yaml(tmp_path: Path, preparer_for: Preparers) -> None:
    with pytest.raises(DatasetError, match=r"dataset YAML not found: .*nope\.yaml"):
        await preparer_for().prepare(request(str(tmp_path / "nope.yaml")), "r", tmp_path / "ws")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train: images/train\nnames: [a]\n", "no 'val' key"),
        ("val: images/val\nnames: [a]\n", "no 'train' key"),
        ("train: images/train\nval: images/val\n", "no 'names' key"),
        ("train: [images/train\nval: x\n", "not valid YAML"),
        ("- just\n- a list\n", "must be a mapping"),
        ("train: images/train\nval: images/val\nnames: [a, b]\nnc: 3\n", "'nc' is 3 but 'names' has 2"),
        ("train: 5\nval: images/val\nnames: [a]\n", "key 'train' must be a path"),
        ("path: [x]\ntrain: a\nval: b\nnames: [a]\n", "key 'path' must be a string"),
    ],
)
async def test_bad_yaml(tmp_path: Path, preparer_for: Preparers, text: str, message: str) -> None:
    basic_dataset(tmp_path / "proj")
    (tmp_path / "proj" / "data.yaml").write_text(text)
    with pytest.raises(DatasetError, match=message):
        await preparer_for().prepare(request(str(tmp_path / "proj" / "data.yaml")), "r", tmp_path / "ws")


async def test_no_label_files(tmp_path: Path, preparer_for: Preparers) -> None:
    src = tmp_path / "proj"
    write_tree(
        src,
        {
            "images/train/a.jpg": JPEG,
            "images/val/b.jpg": JPEG,
            "data.yaml": data_yaml(train="images/train", val="images/val"),
        },
    )
    with pytest.raises(DatasetError, match="no labels found"):
        await preparer_for().prepare(request(str(src / "data.yaml")), "r", tmp_path / "ws")


async def test_only_empty_or_invalid_labels(tmp_path: Path, preparer_for: Preparers) -> None:
    src = tmp_path / "proj"
    basic_dataset(src)
    write_tree(
        src, {"labels/train/a.txt": "", "labels/train/b.txt": "7 0.5 0.5 0.1 0.1\n", "labels/val/c.txt": "\n"}
    )
    with pytest.raises(DatasetError, match=r"no labels found.*1 invalid lines dropped"):
        await preparer_for().prepare(request(str(src / "data.yaml")), "r", tmp_path / "ws")


async def test_invalid_lines_dropped_in_the_workspace_only(tmp_path: Path, preparer_for: Preparers) -> None:
    src = tmp_path / "proj"
    basic_dataset(src)
    bad = "0 0.5 0.5 0.2 0.2\n5 0.5 0.5 0.1 0.1\nhello\n0 2 2 0.1 0.1\n0 0.5 0.5 0 0\n0 1.004 0.5 0.1 0.1\n"
    write_tree(src, {"labels/train/a.txt": bad})
    before = snapshot(src)
    prepared = await preparer_for().prepare(request(str(src / "data.yaml")), "r", tmp_path / "ws")
    assert snapshot(src) == before
    written = (tmp_path / "ws/dataset/labels/train/a.txt").read_text()
    assert written == "0 0.5 0.5 0.2 0.2\n0 0.977 0.5 0.046 0.1\n"
    assert prepared.summary["dropped"] == 4
    assert prepared.summary["clipped"] == 1


async def test_truncated_jpeg_is_copied_not_linked(tmp_path: Path, preparer_for: Preparers) -> None:
    # Ultralytics re-saves a JPEG lacking its end marker in place: through a hard link, the user's file.
    src = tmp_path / "proj"
    basic_dataset(src)
    (src / "images/train/a.jpg").write_bytes(JPEG[:-2])
    prepared = await preparer_for().prepare(request(str(src / "data.yaml")), "r", tmp_path / "ws")
    copy = tmp_path / "ws/dataset/images/train/a.jpg"
    assert not os.path.samefile(copy, src / "images/train/a.jpg")
    assert copy.read_bytes() == JPEG[:-2]
    assert (prepared.summary["linked"], prepared.summary["copied"]) == (3, 1)


async def test_images_are_copied_when_links_are_impossible(
    tmp_path: Path, preparer_for: Preparers, monkeypatch: pytest.MonkeyPatch
) -> None:
    def cross_device(src: Any, dst: Any, **kwargs: Any) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    yaml_path = basic_dataset(tmp_path / "proj")
    prepared = await preparer_for().prepare(request(str(yaml_path)), "r", tmp_path / "ws")
    assert (prepared.summary["linked"], prepared.summary["copied"]) == (0, 4)
    assert (tmp_path / "ws/dataset/images/val/c.jpg").read_bytes() == jpeg("c")


async def test_symlinked_image_folder_is_followed_without_symlinks_in_the_workspace(
    tmp_path: Path, preparer_for: Preparers
) -> None:
    src = tmp_path / "proj"
    basic_dataset(src)
    elsewhere = tmp_path / "disk2" / "val"
    elsewhere.mkdir(parents=True)
    (src / "images/val/c.jpg").rename(elsewhere / "c.jpg")
    (src / "images/val").rmdir()
    (src / "images/val").symlink_to(elsewhere)
    prepared = await preparer_for().prepare(request(str(src / "data.yaml")), "r", tmp_path / "ws")
    ds = tmp_path / "ws/dataset"
    assert not (ds / "images/val").is_symlink()
    assert os.path.samefile(ds / "images/val/c.jpg", elsewhere / "c.jpg")
    assert prepared.summary["images"] == 4


async def test_yaml_path_may_be_a_symlinked_folder_inside_the_dataset(
    tmp_path: Path, preparer_for: Preparers
) -> None:
    basic_dataset(tmp_path / "nas" / "proj")
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "data").symlink_to(tmp_path / "nas" / "proj")
    write_tree(
        tmp_path / "proj", {"data.yaml": data_yaml(path="data", train="images/train", val="images/val")}
    )
    prepared = await preparer_for().prepare(request(str(tmp_path / "proj/data.yaml")), "r", tmp_path / "ws")
    assert prepared.summary["images"] == 4


async def test_second_attempt_rebuilds_the_workspace(tmp_path: Path, preparer_for: Preparers) -> None:
    src = tmp_path / "proj"
    basic_dataset(src)
    preparer = preparer_for()
    await preparer.prepare(request(str(src / "data.yaml")), "r", tmp_path / "ws")
    (tmp_path / "ws/dataset/labels/train.cache").write_text("stale")
    (src / "labels/train/a.txt").unlink()
    prepared = await preparer.prepare(request(str(src / "data.yaml")), "r", tmp_path / "ws")
    assert not (tmp_path / "ws/dataset/labels/train.cache").exists()
    assert not (tmp_path / "ws/dataset/labels/train/a.txt").exists()
    assert prepared.summary["labels"] == 2


async def test_filesystem_work_runs_off_the_event_loop(
    tmp_path: Path, preparer_for: Preparers, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[threading.Thread] = []
    original = workspace_module.normalize_text  # type: ignore[attr-defined]

    def spy(*args: Any) -> Any:
        threads.append(threading.current_thread())
        return original(*args)

    monkeypatch.setattr(workspace_module, "normalize_text", spy)
    yaml_path = basic_dataset(tmp_path / "proj")
    await preparer_for().prepare(request(str(yaml_path)), "r", tmp_path / "ws")
    assert threads
    assert all(t is not threading.main_thread() for t in threads)


@pytest.mark.parametrize("task", ["detect", "segment"])
async def test_synthetic_dataset(tmp_path: Path, preparer_for: Preparers, task: str) -> None:
    synthetic = pytest.importorskip("agent.datasets.synthetic")
    yaml_path = synthetic.make_dataset(tmp_path / "synth", task, train=6, val=2, imgsz=64)
    before = snapshot(tmp_path / "synth")
    prepared = await preparer_for().prepare(request(str(yaml_path)), "r", tmp_path / "ws")
    assert snapshot(tmp_path / "synth") == before
    assert prepared.task == task
    assert prepared.summary["images"] == 8
    assert prepared.summary["dropped"] == 0
    assert prepared.summary["instances"] >= 8
