"""Small synthetic YOLO datasets (coloured shapes on noise) for tests, benchmarks and the demo."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import yaml
from PIL import Image, ImageDraw

SyntheticTask = Literal["detect", "segment"]
Point = tuple[float, float]

DEFAULT_CLASSES = ("circle", "square", "triangle")
_CIRCLE_POINTS = 24
# Shape of class i is _SHAPES[i % 5]; class names are only labels.
_SHAPES = ("circle", "square", "triangle", "diamond", "star")


def make_dataset(
    root: Path,
    task: SyntheticTask,
    *,
    train: int = 32,
    val: int = 8,
    imgsz: int = 128,
    seed: int = 0,
    classes: Sequence[str] = DEFAULT_CLASSES,
) -> Path:
    """Write images, labels and data.yaml under `root` and return the yaml path (deterministic per seed)."""
    if task not in ("detect", "segment"):
        raise ValueError(f"task must be 'detect' or 'segment', not {task!r}")
    if not classes:
        raise ValueError("at least one class is required")
    if imgsz < 32:
        raise ValueError("imgsz must be at least 32")
    root = Path(root).resolve()
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        images = root / "images" / split
        labels = root / "labels" / split
        images.mkdir(parents=True, exist_ok=True)
        labels.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            image, lines = _sample(rng, task, imgsz, len(classes))
            stem = f"{split}_{index:05d}"
            image.save(images / f"{stem}.jpg", quality=92)
            (labels / f"{stem}.txt").write_text("".join(f"{line}\n" for line in lines))
    data = {
        "path": str(root),
        "train": "images/train",
        "val": "images/val",
        "names": dict(enumerate(classes)),
    }
    yaml_path = root / "data.yaml"
    yaml_path.write_text(yaml.safe_dump(data, sort_keys=False))
    return yaml_path


def _sample(
    rng: np.random.Generator, task: SyntheticTask, size: int, n_classes: int
) -> tuple[Image.Image, list[str]]:
    # Mid-grey noise keeps the background busy without hiding the shapes' edges.
    noise = rng.integers(60, 196, size=(size, size, 3), dtype=np.uint8)
    image = Image.fromarray(noise, "RGB")
    draw = ImageDraw.Draw(image)
    placed: list[tuple[float, float, float, float]] = []
    lines: list[str] = []
    for _ in range(int(rng.integers(1, 4))):
        box = _free_box(rng, size, placed)
        if box is None:
            break
        placed.append(box)
        cls = int(rng.integers(0, n_classes))
        colour = _colour(rng)
        polygon = _shape(cls, box)
        if cls % len(_SHAPES) == 0:
            draw.ellipse(box, fill=colour)
        else:
            draw.polygon(polygon, fill=colour)
        lines.append(_label(task, cls, polygon, size))
    return image, lines


def _free_box(
    rng: np.random.Generator, size: int, placed: list[tuple[float, float, float, float]]
) -> tuple[float, float, float, float] | None:
    """A square box of 22–45 % of the image that does not overlap the shapes already drawn."""
    for _ in range(30):
        side = float(rng.uniform(0.22, 0.45)) * size
        x0 = float(rng.uniform(0, size - side))
        y0 = float(rng.uniform(0, size - side))
        box = (x0, y0, x0 + side, y0 + side)
        if all(box[2] <= p[0] or box[0] >= p[2] or box[3] <= p[1] or box[1] >= p[3] for p in placed):
            return box
    return None


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    # Saturated colours: one channel high, one low, so shapes stand out from the grey noise.
    channels = rng.permutation(3)
    rgb = [0, 0, 0]
    rgb[channels[0]] = int(rng.integers(200, 256))
    rgb[channels[1]] = int(rng.integers(0, 50))
    rgb[channels[2]] = int(rng.integers(0, 256))
    return rgb[0], rgb[1], rgb[2]


def _shape(cls: int, box: tuple[float, float, float, float]) -> list[Point]:
    """The outline of class `cls` in `box`: circle, square, triangle, diamond, star, then again."""
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    kind = _SHAPES[cls % len(_SHAPES)]
    if kind == "circle":
        steps = [2 * math.pi * k / _CIRCLE_POINTS for k in range(_CIRCLE_POINTS)]
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in steps]
    if kind == "square":
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if kind == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if kind == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    # A five-pointed star whose outer points touch the box's top and sides.
    return [
        (
            cx + (r if k % 2 == 0 else r * 0.45) * math.sin(math.pi * k / 5),
            cy - (r if k % 2 == 0 else r * 0.45) * math.cos(math.pi * k / 5),
        )
        for k in range(10)
    ]


def _label(task: SyntheticTask, cls: int, polygon: list[Point], size: int) -> str:
    if task == "segment":
        coords = " ".join(f"{_clip(x / size):.6f} {_clip(y / size):.6f}" for x, y in polygon)
        return f"{cls} {coords}"
    # The outline's own bounds: a star does not fill its square.
    xs, ys = [x for x, _ in polygon], [y for _, y in polygon]
    x0, y0, x1, y1 = min(xs), min(ys), max(xs), max(ys)
    cx, cy = (x0 + x1) / 2 / size, (y0 + y1) / 2 / size
    w, h = (x1 - x0) / size, (y1 - y0) / size
    return f"{cls} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}"


def _clip(value: float) -> float:
    return min(1.0, max(0.0, value))
