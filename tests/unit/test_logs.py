"""Log lines a person reads: short fields, one line per epoch, a finish line that says it all."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from loguru import logger

from agent import logs
from agent.backends.memory import MemoryEvents
from agent.core.pipeline import without_secrets
from agent.ports import HintSink
from tests.unit.test_core import harness, run_config
from tests.util import wait_for


@pytest.fixture
def captured() -> Iterator[list[dict[str, Any]]]:
    records: list[dict[str, Any]] = []
    sink = logger.add(lambda m: records.append(m.record), level="DEBUG", diagnose=False)
    yield records
    logger.remove(sink)


def _text_line(**fields: object) -> str:
    out = io.StringIO()
    logs.setup("INFO")
    logger.remove()
    logger.add(out, level="INFO", diagnose=False, format=logs._text_format, colorize=False)
    try:
        logger.bind(**fields).info("hello")
    finally:
        logs.setup("INFO")
    return out.getvalue()


def test_text_lines_show_fields_as_key_value_and_cut_long_values_in_the_middle() -> None:
    path = "/srv/datasets/" + "x" * 300 + "/data.yaml"
    line = _text_line(run_id="r-1", data=path, counts={"images": 3}, note="<red>{x}</red>")
    assert line.endswith("\n") and line.count("\n") == 1
    assert "hello run_id=r-1 data=/srv/datasets/" in line
    data = line.split(" data=", 1)[1].split(" counts=", 1)[0]
    assert len(data) == logs.FIELD_LIMIT and "…" in data and data.endswith("/data.yaml")
    assert "counts={'images': 3}" in line and "note=<red>{x}</red>" in line
    assert len(line) < 300


def test_json_lines_keep_their_shape_and_cap_each_field() -> None:
    out = io.StringIO()
    logger.remove()
    logger.add(out, level="INFO", diagnose=False, format=logs._json_format, serialize=True)
    try:
        logger.bind(run_id="r-1", blob="y" * 5000, n=3).info("hello")
    finally:
        logs.setup("INFO")
    record = json.loads(out.getvalue())["record"]
    assert record["message"] == "hello"
    assert record["extra"]["run_id"] == "r-1" and record["extra"]["n"] == 3
    assert len(record["extra"]["blob"]) == logs.JSON_FIELD_LIMIT


async def test_a_run_logs_pickup_each_epoch_and_a_finish_with_metrics_and_model(
    tmp_path: Path, captured: list[dict[str, Any]]
) -> None:
    async with harness(tmp_path) as h:
        run_id = h.store.insert_row(data_yaml="d.yaml", configuration=run_config(epochs=3))
        await wait_for(lambda: h.store.runs[run_id].status == "completed", what="completed")
    mine = [r for r in captured if r["extra"].get("run_id") == run_id and r["level"].no >= 20]
    claimed = [r for r in mine if r["message"] == "run claimed"]
    assert len(claimed) == 1 and claimed[0]["extra"]["epochs"] == 3
    epochs = [r["extra"] for r in mine if r["message"] == "epoch done"]
    assert [e["epoch"] for e in epochs] == ["1/3", "2/3", "3/3"]
    assert epochs[-1]["mAP50"] == pytest.approx(0.3) and epochs[-1]["loss"] == pytest.approx(1 / 3, abs=1e-3)
    assert all("eta" in e for e in epochs)
    finished = [r["extra"] for r in mine if r["message"] == "run finished"]
    assert len(finished) == 1
    assert finished[0]["outcome"] == "completed"
    assert finished[0]["mAP50-95"] == pytest.approx(0.15)
    assert finished[0]["model"] == h.blobs.url(f"training_runs/{run_id}/weights/best.pt")
    assert [r["message"] for r in mine if r["message"] == "training finished"] == []


class SlowToSubscribe(MemoryEvents):
    """A stream whose first subscription takes a moment, as a real one does (a round trip or two)."""

    async def listen(self, sink: HintSink, on_subscribed: Callable[[], None]) -> None:
        await asyncio.sleep(0.1)  # the subscription's latency, not a synchronisation
        await super().listen(sink, on_subscribed)


async def test_no_event_stream_warning_while_the_first_subscription_is_under_way(
    tmp_path: Path, captured: list[dict[str, Any]]
) -> None:
    h = harness(tmp_path, degraded_poll_interval=1.0)
    h.agent.events = h.events = SlowToSubscribe(h.store)
    async with h:
        run_id = h.store.insert_row(data_yaml="d.yaml", configuration=run_config(epochs=1))
        await wait_for(lambda: h.store.runs[run_id].status == "completed", what="completed")
    assert h.events.subscriptions == 1
    assert not [r for r in captured if r["message"].startswith("event stream down")]


async def test_a_stream_that_never_comes_up_is_reported(
    tmp_path: Path, captured: list[dict[str, Any]]
) -> None:
    h = harness(tmp_path, degraded_poll_interval=0.3)
    h.events.disconnect()
    task = asyncio.create_task(h.agent.run())
    try:
        await wait_for(
            lambda: [r for r in captured if r["message"].startswith("event stream down")],
            timeout=5,
            what="degraded warning",
        )
    finally:
        h.agent.stop("test over")
        await asyncio.wait_for(task, 10)


def test_a_dataset_url_is_logged_without_its_token_or_user_info() -> None:
    signed = "https://user:pw@x.supabase.co:8443/storage/v1/object/sign/datasets/a/data.yaml?token=eyJ.abc"
    assert without_secrets(signed) == "https://x.supabase.co:8443/storage/v1/object/sign/datasets/a/data.yaml"
    for plain in ("storage:datasets/a/data.yaml", "/srv/data/a.yaml", "a/data.yaml"):
        assert without_secrets(plain) == plain
