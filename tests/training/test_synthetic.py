"""The synthetic dataset generator."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from agent.datasets.synthetic import make_dataset


def digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "data.yaml"
    }


def test_layout_and_yaml(tmp_path: Path) -> None:
    path = make_dataset(tmp_path / "ds", "detect", train=5, val=2, imgsz=64)
    data = yaml.safe_load(path.read_text())
    assert data == {
        "path": str(tmp_path / "ds"),
        "train": "images/train",
        "val": "images/val",
        "names": {0: "circle", 1: "square", 2: "triangle"},
    }
    for split, count in (("train", 5), ("val", 2)):
        assert len(list((tmp_path / "ds" / "images" / split).glob("*.jpg"))) == count
        assert len(list((tmp_path / "ds" / "labels" / split).glob("*.txt"))) == count


def test_deterministic_per_seed(tmp_path: Path) -> None:
    make_dataset(tmp_path / "a", "segment", train=4, val=2, seed=7)
    make_dataset(tmp_path / "b", "segment", train=4, val=2, seed=7)
    make_dataset(tmp_path / "c", "segment", train=4, val=2, seed=8)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


@pytest.mark.parametrize("task", ["detect", "segment"])
def test_labels_are_valid_yolo_lines(tmp_path: Path, task: str) -> None:
    make_dataset(tmp_path, task, train=10, val=3, classes=("a", "b", "c", "d", "e"))  # type: ignore[arg-type]
    lines = [line for f in tmp_path.glob("labels/*/*.txt") for line in f.read_text().splitlines()]
    assert lines
    for line in lines:
        cls, *coords = line.split()
        assert 0 <= int(cls) < 5
        values = [float(v) for v in coords]
        assert all(0.0 <= v <= 1.0 for v in values)
        if task == "detect":
            assert len(values) == 4 and values[2] > 0.1 and values[3] > 0.1
        else:
            assert len(values) >= 6 and len(values) % 2 == 0
