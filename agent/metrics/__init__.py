"""Prometheus metrics and the health endpoints, served on METRICS_PORT.

Metric names are an interface (dashboards and alerts use them): rename none without a release note.

    saturnos_runs_claimed_total                       claims won
    saturnos_runs_finished_total{outcome}             completed | failed | canceled (final write landed)
    saturnos_claim_conflicts_total                    claims lost to another worker
    saturnos_pickup_latency_seconds                   histogram: row created_at -> claimed
    saturnos_cancel_latency_seconds                   histogram: cancel heard -> child group gone
    saturnos_event_stream_up                          1 while the event stream is subscribed
    saturnos_event_stream_reconnects_total            re-subscriptions after the first
    saturnos_event_stream_rebuilds_total              client/channel rebuilds (Supabase backend; else 0)
    saturnos_catchup_polls_total                      polls run because the stream (re)subscribed
    saturnos_catchup_polls_found_total                claimable runs a catch-up poll found unannounced
    saturnos_backend_retries_total{operation}         transient backend errors retried
    saturnos_slots_total / _busy / _free              device slots
    saturnos_checkpoint_uploads_total{result}         ok | failed
    saturnos_database_up                              1 while the last poll or registry write landed
    saturnos_ready                                    what /readyz answers, as 0/1
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable, Iterator

from loguru import logger
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.ports import Health, RunEnd, RunEvents
from agent.retry import add_retry_observer

PREFIX = "saturnos"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_PICKUP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)
_CANCEL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0)
# A retried operation's name may carry a file path ("upload weights/best.pt"): keep the verb only,
# so the label set stays small.
_PATHLIKE = re.compile(r"\s+\S*[/.]\S*")


def operation_label(what: str) -> str:
    return _PATHLIKE.sub("", what).strip() or "other"


class PrometheusMetrics:
    """The Metrics port on a private registry (several agents may share a process in tests)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.claimed = Counter(f"{PREFIX}_runs_claimed", "Claims won", registry=r)
        self.finished = Counter(
            f"{PREFIX}_runs_finished", "Runs whose final write landed", ["outcome"], registry=r
        )
        for outcome in ("completed", "failed", "canceled"):
            self.finished.labels(outcome)
        self.conflicts = Counter(f"{PREFIX}_claim_conflicts", "Claims lost to another worker", registry=r)
        self.pickup = Histogram(
            f"{PREFIX}_pickup_latency_seconds",
            "From the row's created_at to the claim",
            buckets=_PICKUP_BUCKETS,
            registry=r,
        )
        self.cancel = Histogram(
            f"{PREFIX}_cancel_latency_seconds",
            "From hearing a cancel to the trainer's process group being gone",
            buckets=_CANCEL_BUCKETS,
            registry=r,
        )
        self.reconnects = Counter(
            f"{PREFIX}_event_stream_reconnects", "Event stream re-subscriptions after the first", registry=r
        )
        self.catch_ups = Counter(
            f"{PREFIX}_catchup_polls", "Polls run because the event stream (re)subscribed", registry=r
        )
        self.missed = Counter(
            f"{PREFIX}_catchup_polls_found", "Claimable runs a catch-up poll found with no event", registry=r
        )
        self.retries = Counter(
            f"{PREFIX}_backend_retries", "Transient backend errors retried", ["operation"], registry=r
        )
        self.checkpoints = Counter(
            f"{PREFIX}_checkpoint_uploads", "Checkpoint uploads during training", ["result"], registry=r
        )
        for result in ("ok", "failed"):
            self.checkpoints.labels(result)
        ProcessCollector(registry=r)

    # The Metrics port.
    def run_claimed(self, pickup_seconds: float | None) -> None:
        self.claimed.inc()
        if pickup_seconds is not None:
            self.pickup.observe(max(0.0, pickup_seconds))

    def claim_conflict(self) -> None:
        self.conflicts.inc()

    def run_finished(self, outcome: RunEnd) -> None:
        self.finished.labels(outcome).inc()

    def cancel_stopped(self, seconds: float) -> None:
        self.cancel.observe(seconds)

    def stream_subscribed(self, first: bool) -> None:
        if not first:
            self.reconnects.inc()

    def catch_up(self, missed: int) -> None:
        self.catch_ups.inc()
        self.missed.inc(missed)

    def checkpoint_uploaded(self, ok: bool) -> None:
        self.checkpoints.labels("ok" if ok else "failed").inc()

    def backend_retry(self, what: str) -> None:
        self.retries.labels(operation_label(what)).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _Live(Collector):
    """Values read at scrape time: health, slots and the event stream's own counters."""

    def __init__(self, health: Callable[[], Health], events: RunEvents) -> None:
        self._health = health
        self._events = events

    def collect(self) -> Iterator[Metric]:
        h = self._health()
        gauges = {
            "event_stream_up": ("1 while the event stream is subscribed", h.stream),
            "database_up": ("1 while the last poll or registry write landed", h.database),
            "ready": ("What /readyz answers, as 0/1", h.ready),
            "slots_total": ("Device slots of this agent", h.slots_total),
            "slots_busy": ("Device slots held by runs", h.slots_busy),
            "slots_free": ("Device slots free for new runs", h.slots_total - h.slots_busy),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=float(value))
        # Only the Supabase stream rebuilds its client; 0 elsewhere keeps dashboards and alerts simple.
        rebuilds = getattr(self._events, "rebuilds", 0)
        yield CounterMetricFamily(
            f"{PREFIX}_event_stream_rebuilds",
            "Event stream client or channel rebuilds",
            value=rebuilds if isinstance(rebuilds, int) else 0,
        )


async def serve(
    port: int, metrics: PrometheusMetrics, health: Callable[[], Health], events: RunEvents, host: str = ""
) -> None:
    """Serve /metrics, /healthz and /readyz until cancelled (on the agent's loop: a stuck loop fails)."""
    live = _Live(health, events)
    metrics.registry.register(live)
    remove_observer = add_retry_observer(metrics.backend_retry)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                request = await reader.readline()
                while (await reader.readline()).strip():
                    pass  # headers: none needed
            parts = request.decode("latin-1").split()
            path = parts[1].split("?", 1)[0] if len(parts) >= 2 else ""
            status, ctype, body = _answer(path, metrics, health())
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, host or None, port)
    logger.bind(port=port).info("metrics and health endpoint listening")
    try:
        async with server:
            await server.serve_forever()
    finally:
        remove_observer()
        metrics.registry.unregister(live)


def _answer(path: str, metrics: PrometheusMetrics, health: Health) -> tuple[str, str, bytes]:
    text = "text/plain; charset=utf-8"
    if path == "/metrics":
        return "200 OK", CONTENT_TYPE, metrics.exposition()
    if path == "/healthz":
        return ("200 OK", text, b"ok\n") if health.alive else ("503 Service Unavailable", text, b"stopped\n")
    if path == "/readyz":
        if health.ready:
            return "200 OK", text, b"ready\n"
        why = [
            name
            for name, ok in (("agent stopped", health.alive), ("database unreachable", health.database))
            if not ok
        ]
        if not (health.stream or health.polling):
            why.append("neither event stream nor poll working")
        return "503 Service Unavailable", text, ("; ".join(why) + "\n").encode()
    return "404 Not Found", text, b"not found: try /metrics, /healthz, /readyz\n"
