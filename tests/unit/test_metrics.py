"""The Prometheus adapter: what the core counts shows up under stable names."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.domain.errors import BackendUnavailable
from agent.metrics import PrometheusMetrics, operation_label
from agent.retry import add_retry_observer, transient
from tests.unit.test_dispatch import DeviceTrainer, finished, make_agent, serving, shutdown
from tests.util import wait_for


def sample(metrics: PrometheusMetrics, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return 0.0


@pytest.mark.parametrize(
    ("what", "label"),
    [("poll", "poll"), ("upload weights/best.pt", "upload"), ("checkpoint upload", "checkpoint upload")],
)
def test_retry_labels_stay_few(what: str, label: str) -> None:
    assert operation_label(what) == label


async def test_backend_retries_are_counted_by_operation() -> None:
    metrics = PrometheusMetrics()
    remove = add_retry_observer(metrics.backend_retry)
    failures = iter([BackendUnavailable("down"), BackendUnavailable("down")])

    async def flaky() -> str:
        error = next(failures, None)
        if error is not None:
            raise error
        return "ok"

    try:
        assert await transient("claim read", flaky, within=5.0) == "ok"
    finally:
        remove()
    assert sample(metrics, "saturnos_backend_retries_total", operation="claim read") == 2


async def test_a_catch_up_poll_counts_the_runs_the_events_missed(tmp_path: Path) -> None:
    metrics = PrometheusMetrics()
    agent, store, events = make_agent(tmp_path, DeviceTrainer(seconds=0.05), poll_interval=3600.0)
    agent.deps = dataclasses.replace(agent.deps, metrics=metrics)
    task = await serving(agent)
    await wait_for(lambda: sample(metrics, "saturnos_catchup_polls_total") == 1, what="first catch-up")

    events.disconnect()
    missed = store.insert_row(data_yaml="d.yaml", configuration={"trainer": "fake", "epochs": 1})
    assert store.runs[missed].status == "queued"
    events.reconnect()
    await wait_for(lambda: finished(store, missed), what="picked up by the catch-up poll")
    await shutdown(agent, task)

    assert sample(metrics, "saturnos_catchup_polls_total") == 2
    assert sample(metrics, "saturnos_catchup_polls_found_total") == 1
    assert sample(metrics, "saturnos_event_stream_reconnects_total") == 1
    assert sample(metrics, "saturnos_runs_claimed_total") == 1
    assert sample(metrics, "saturnos_runs_finished_total", outcome="completed") == 1
