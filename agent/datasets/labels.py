"""YOLO label lines: validated, clipped and converted to the task's shape (detect: box, segment: polygon).

A line is `class x_center y_center width height` (a box) or `class x1 y1 x2 y2 x3 y3 …` (a polygon, at
least three points), every coordinate normalized to [0, 1]. Lines that cannot be trusted are dropped
and counted by reason; nothing is guessed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Literal

from agent.domain.request import Task

Shape = Literal["box", "polygon"]
DropReason = Literal["malformed", "bad_class", "out_of_range", "degenerate", "duplicate"]

# Annotation tools overshoot the border by rounding; up to 1 % of the image is clipped, beyond is dropped.
TOLERANCE = 0.01
MIN_EXTENT = 1e-6
MIN_AREA = 1e-9


@dataclass(slots=True)
class LabelStats:
    files: int = 0
    empty_files: int = 0
    kept: int = 0
    converted: int = 0
    clipped: int = 0
    malformed: int = 0
    bad_class: int = 0
    out_of_range: int = 0
    degenerate: int = 0
    duplicate: int = 0

    @property
    def dropped(self) -> int:
        return self.malformed + self.bad_class + self.out_of_range + self.degenerate + self.duplicate

    def add(self, other: LabelStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, int]:
        counts = {f.name: getattr(self, f.name) for f in fields(self)}
        counts["dropped"] = self.dropped
        return counts


@dataclass(frozen=True, slots=True)
class Dropped:
    line_no: int
    reason: DropReason
    text: str


@dataclass(slots=True)
class Normalized:
    lines: list[str]
    stats: LabelStats
    dropped: list[Dropped] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(f"{line}\n" for line in self.lines)


class _Drop(Exception):
    def __init__(self, reason: DropReason) -> None:
        self.reason = reason


def shape_of(line: str) -> Shape | None:
    """The shape a line is written as, judged by its field count (for task inference); None if neither."""
    parts = line.split()
    if not parts:
        return None
    count = len(parts) - 1
    if count == 4:
        return "box"
    if count >= 6 and count % 2 == 0:
        return "polygon"
    return None


def infer_task(boxes: int, polygons: int) -> Task:
    """Polygons only → segment; boxes, mixed or nothing → detect (the old trainer's rule)."""
    return "segment" if polygons and not boxes else "detect"


def normalize_text(text: str, task: Task, nc: int) -> Normalized:
    """Every valid line of a label file in the task's shape; the rest counted and listed as dropped."""
    stats = LabelStats(files=1)
    out: list[str] = []
    seen: set[str] = set()
    drops: list[Dropped] = []
    for line_no, raw in enumerate(text.splitlines(), start=1):
        parts = raw.split()
        if not parts:
            continue
        try:
            line, converted, clipped = _normalize(parts, task, nc)
            if line in seen:
                raise _Drop("duplicate")
        except _Drop as drop:
            setattr(stats, drop.reason, getattr(stats, drop.reason) + 1)
            drops.append(Dropped(line_no, drop.reason, raw.strip()[:200]))
            continue
        seen.add(line)
        out.append(line)
        stats.kept += 1
        stats.converted += converted
        stats.clipped += clipped
    if not out:
        stats.empty_files = 1
    return Normalized(out, stats, drops)


def _normalize(parts: list[str], task: Task, nc: int) -> tuple[str, bool, bool]:
    cls = _class_id(parts[0], nc)
    values = _numbers(parts[1:])
    if len(values) == 4:
        box, clipped = _box(values)
        if task == "detect":
            text = _format(cls, box) if clipped else " ".join([str(cls), *parts[1:]])
            return text, False, clipped
        x1, y1, x2, y2 = _corners(box)
        return _format(cls, [x1, y1, x2, y1, x2, y2, x1, y2]), True, clipped
    if len(values) >= 6 and len(values) % 2 == 0:
        points, clipped = _polygon(values)
        if task == "segment":
            text = _format(cls, points) if clipped else " ".join([str(cls), *parts[1:]])
            return text, False, clipped
        xs, ys = points[0::2], points[1::2]
        x1, x2, y1, y2 = min(xs), max(xs), min(ys), max(ys)
        return _format(cls, [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]), True, clipped
    raise _Drop("malformed")


def _class_id(text: str, nc: int) -> int:
    try:
        value = float(text)
    except ValueError:
        raise _Drop("malformed") from None
    # Some exporters write class ids as floats ("2.0"); a fraction is not a class.
    if not math.isfinite(value) or not value.is_integer() or not 0 <= value < nc:
        raise _Drop("bad_class")
    return int(value)


def _numbers(parts: list[str]) -> list[float]:
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise _Drop("malformed") from None
    if not all(math.isfinite(v) for v in values):
        raise _Drop("malformed")
    return values


def _in_range(values: list[float]) -> None:
    if any(v < -TOLERANCE or v > 1 + TOLERANCE for v in values):
        raise _Drop("out_of_range")


def _clip(value: float) -> float:
    return min(1.0, max(0.0, value))


def _box(values: list[float]) -> tuple[list[float], bool]:
    _in_range(values)
    cx, cy, w, h = values
    if w <= MIN_EXTENT or h <= MIN_EXTENT:
        raise _Drop("degenerate")
    x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    cx1, cy1, cx2, cy2 = _clip(x1), _clip(y1), _clip(x2), _clip(y2)
    if cx2 - cx1 <= MIN_EXTENT or cy2 - cy1 <= MIN_EXTENT:
        raise _Drop("degenerate")
    clipped = (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2) or any(v != _clip(v) for v in values)
    return [(cx1 + cx2) / 2, (cy1 + cy2) / 2, cx2 - cx1, cy2 - cy1], clipped


def _corners(box: list[float]) -> tuple[float, float, float, float]:
    cx, cy, w, h = box
    return _clip(cx - w / 2), _clip(cy - h / 2), _clip(cx + w / 2), _clip(cy + h / 2)


def _polygon(values: list[float]) -> tuple[list[float], bool]:
    _in_range(values)
    points = [_clip(v) for v in values]
    distinct = {(points[i], points[i + 1]) for i in range(0, len(points), 2)}
    if len(distinct) < 3 or abs(_area(points)) <= MIN_AREA:
        raise _Drop("degenerate")
    return points, points != values


def _area(points: list[float]) -> float:
    xs, ys = points[0::2], points[1::2]
    n = len(xs)
    return sum(xs[i] * ys[(i + 1) % n] - xs[(i + 1) % n] * ys[i] for i in range(n)) / 2


def _format(cls: int, values: list[float]) -> str:
    return " ".join([str(cls), *(_number(v) for v in values)])


def _number(value: float) -> str:
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text if text not in ("", "-0") else "0"
