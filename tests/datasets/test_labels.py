from __future__ import annotations

import pytest

from agent.datasets.labels import infer_task, normalize_text, shape_of


def test_box_is_kept_verbatim_for_detect() -> None:
    result = normalize_text("0 0.5 0.5 0.25 0.125\n", "detect", 2)
    assert result.lines == ["0 0.5 0.5 0.25 0.125"]
    assert (result.stats.kept, result.stats.converted, result.stats.dropped) == (1, 0, 0)


def test_polygon_becomes_its_bounding_box_for_detect() -> None:
    result = normalize_text("1 0.1 0.2 0.5 0.2 0.5 0.6 0.1 0.6\n", "detect", 2)
    assert result.lines == ["1 0.3 0.4 0.4 0.4"]
    assert result.stats.converted == 1


def test_box_becomes_a_rectangle_for_segment() -> None:
    result = normalize_text("1 0.5 0.5 0.2 0.4\n", "segment", 2)
    assert result.lines == ["1 0.4 0.3 0.6 0.3 0.6 0.7 0.4 0.7"]
    assert result.stats.converted == 1


def test_polygon_is_kept_verbatim_for_segment() -> None:
    line = "0 0.1 0.1 0.9 0.1 0.5 0.8"
    assert normalize_text(line, "segment", 1).lines == [line]


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("cat 0.5 0.5 0.1 0.1", "malformed"),
        ("0 0.5 x 0.1 0.1", "malformed"),
        ("0 nan 0.5 0.1 0.1", "malformed"),
        ("0 inf 0.5 0.1 0.1", "malformed"),
        ("0", "malformed"),
        ("0 0.5 0.5", "malformed"),
        ("0 0.5 0.5 0.1", "malformed"),
        ("0 0.5 0.5 0.1 0.1 0.2", "malformed"),
        ("0 0.1 0.1 0.2 0.2 0.3", "malformed"),
        ("0 0.1 0.1 0.2 0.2 0.3 0.1 0.4", "malformed"),
        ("1.5 0.5 0.5 0.1 0.1", "bad_class"),
        ("-1 0.5 0.5 0.1 0.1", "bad_class"),
        ("2 0.5 0.5 0.1 0.1", "bad_class"),
        ("0 1.5 0.5 0.1 0.1", "out_of_range"),
        ("0 0.5 -0.2 0.1 0.1", "out_of_range"),
        ("0 0.1 0.1 0.9 0.1 0.5 1.3", "out_of_range"),
        ("0 0.5 0.5 0 0.1", "degenerate"),
        ("0 0.5 0.5 0.1 -0.005", "degenerate"),
        ("0 0.1 0.1 0.5 0.5 0.9 0.9", "degenerate"),
        ("0 0.1 0.1 0.1 0.1 0.5 0.5", "degenerate"),
    ],
)
@pytest.mark.parametrize("task", ["detect", "segment"])
def test_invalid_lines_are_dropped_with_a_reason(line: str, reason: str, task: str) -> None:
    result = normalize_text(f"0 0.5 0.5 0.1 0.1\n{line}\n", task, 2)  # type: ignore[arg-type]
    assert result.stats.kept == 1
    assert result.stats.dropped == 1
    assert getattr(result.stats, reason) == 1
    assert [(d.line_no, d.reason) for d in result.dropped] == [(2, reason)]


def test_integral_float_class_ids_are_accepted() -> None:
    assert normalize_text("1.0 0.5 0.5 0.1 0.1", "detect", 2).lines == ["1 0.5 0.5 0.1 0.1"]


def test_tiny_overshoot_is_clipped() -> None:
    result = normalize_text("0 0.1 0.1 1.005 0.1 0.5 -0.004", "segment", 1)
    assert result.lines == ["0 0.1 0.1 1 0.1 0.5 0"]
    assert (result.stats.clipped, result.stats.dropped) == (1, 0)


def test_box_crossing_the_border_is_clipped_to_the_image() -> None:
    result = normalize_text("0 0.95 0.5 0.2 0.2", "detect", 1)
    assert result.lines == ["0 0.925 0.5 0.15 0.2"]
    assert result.stats.clipped == 1


def test_duplicates_blank_lines_and_whitespace() -> None:
    result = normalize_text("\n0 0.5 0.5 0.1 0.1\n   \n0   0.5\t0.5 0.1 0.1  \n", "detect", 1)
    assert result.lines == ["0 0.5 0.5 0.1 0.1"]
    assert (result.stats.kept, result.stats.duplicate) == (1, 1)


def test_empty_file() -> None:
    result = normalize_text("", "detect", 1)
    assert (result.lines, result.text, result.stats.empty_files) == ([], "", 1)


def test_text_ends_with_a_newline() -> None:
    assert normalize_text("0 0.5 0.5 0.1 0.1", "detect", 1).text == "0 0.5 0.5 0.1 0.1\n"


def test_shape_and_task_inference() -> None:
    assert shape_of("0 0.5 0.5 0.1 0.1") == "box"
    assert shape_of("0 0.1 0.1 0.9 0.1 0.5 0.8") == "polygon"
    assert shape_of("0 0.1") is None
    assert infer_task(boxes=0, polygons=3) == "segment"
    assert infer_task(boxes=1, polygons=3) == "detect"
    assert infer_task(boxes=2, polygons=0) == "detect"
    assert infer_task(boxes=0, polygons=0) == "detect"
