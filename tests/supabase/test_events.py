"""Realtime events against the stand-in: instant hints, outages, stalls, and the catch-up window."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from loguru import logger

from agent.backends.supabase import SupabaseBackends, SupabaseEvents, connect_client, realtime_factory
from agent.backends.supabase.transport import http_client
from agent.domain.run import Hint, NewRun
from tests.standin import StandIn
from tests.supabase.harness import FAST
from tests.util import wait_for

NEW = NewRun("/data/a.yaml", "YOLOv8n", {"epochs": 1})


@dataclass
class Heard:
    """What one `listen` reported: hints with their arrival time, and each catch-up."""

    hints: list[tuple[float, Hint]] = field(default_factory=list)
    catch_ups: list[float] = field(default_factory=list)
    failing: bool = False

    def sink(self, hint: Hint) -> None:
        self.hints.append((time.monotonic(), hint))

    def subscribed(self) -> None:
        self.catch_ups.append(time.monotonic())
        if self.failing:
            raise RuntimeError("catch-up failed")

    def for_run(self, run_id: str) -> list[Hint]:
        return [h for _, h in self.hints if h.run_id == run_id]

    def arrival(self, run_id: str) -> float | None:
        return next((t for t, h in self.hints if h.run_id == run_id), None)


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    """Warnings logged during the test, each with its bound `reason` when it has one."""
    messages: list[str] = []

    def record(message: Any) -> None:
        reason = message.record["extra"].get("reason")
        messages.append(message.record["message"] + (f" [{reason}]" if reason else ""))

    sink = logger.add(record, level="WARNING", diagnose=False)
    yield messages
    logger.remove(sink)


@pytest.fixture
def infos() -> Iterator[list[dict[str, object]]]:
    records: list[dict[str, object]] = []
    sink = logger.add(
        lambda m: records.append({"message": m.record["message"], **m.record["extra"]}),
        level="INFO",
        diagnose=False,
    )
    yield records
    logger.remove(sink)


@pytest.fixture
async def events(standin: StandIn) -> AsyncIterator[SupabaseEvents]:
    http = http_client()
    client = await connect_client(standin.url, standin.service_role_key, http)
    try:
        yield SupabaseEvents(
            realtime_factory(client, max_retries=2, initial_backoff=0.05),
            topic="t",
            worker_id="w1",
            tuning=FAST,
        )
    finally:
        await http.aclose()


@asynccontextmanager
async def listening(events: SupabaseEvents, heard: Heard, *, wait: bool = True) -> AsyncIterator[Heard]:
    task = asyncio.create_task(events.listen(heard.sink, heard.subscribed))
    try:
        if wait:
            await wait_for(lambda: heard.catch_ups or task.done(), what="subscribed")
            assert not task.done()
        yield heard
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert not events.healthy


async def test_an_insert_is_heard_well_under_a_second(supa: SupabaseBackends, events: SupabaseEvents) -> None:
    async with listening(events, Heard()) as heard:
        assert events.healthy
        started = time.monotonic()
        run_id = await supa.admin.submit(NEW)
        hints = await wait_for(lambda: heard.for_run(run_id), what="insert hint")
        latency = (heard.arrival(run_id) or 0) - started
    assert hints[0].claimable and hints[0].op == "INSERT"
    assert latency < 0.5, f"insert heard after {latency:.3f}s"


async def test_a_cancel_button_press_on_an_owned_run_is_heard(
    supa: SupabaseBackends, events: SupabaseEvents
) -> None:
    async with listening(events, Heard()) as heard:
        run_id = await supa.admin.submit(NEW)
        await wait_for(lambda: heard.for_run(run_id), what="insert hint")
        claim = await supa.store.claim(run_id, "w1")
        assert claim is not None
        events.follow(frozenset({run_id}))
        await wait_for(lambda: len(heard.for_run(run_id)) == 2, what="the held run's feed up")
        assert await supa.store.touch(claim.lease, {"progress": {"epoch": 1}})
        started = time.monotonic()
        assert await supa.admin.request_cancel(run_id)
        hints = await wait_for(lambda: len(heard.for_run(run_id)) >= 3 and heard.for_run(run_id))
        latency = heard.hints[-1][0] - started
    # The feed's CHECK; the progress write between it and the cancel is not a hint.
    assert [h.op for h in hints[:3]] == ["INSERT", "CHECK", "UPDATE"]
    assert (hints[2].cancel_requested, hints[2].worker_id, hints[2].claimable) == (True, "w1", False)
    assert latency < 0.5


async def test_realtime_down_then_up_resubscribes_by_itself(
    supa: SupabaseBackends,
    standin: StandIn,
    events: SupabaseEvents,
    warnings: list[str],
    infos: list[dict[str, object]],
) -> None:
    async with listening(events, Heard()) as heard:
        standin.faults.realtime_down()
        await wait_for(lambda: not events.healthy, what="unhealthy")
        missed = await supa.admin.submit(NEW)
        # The supervisor keeps rebuilding the client while the server refuses it, logging once.
        rebuilds = events.rebuilds
        await wait_for(lambda: events.rebuilds >= rebuilds + 3, what="several rebuilds")
        assert not events.healthy and len(heard.catch_ups) == 1

        standin.faults.realtime_up()
        await wait_for(lambda: events.healthy and len(heard.catch_ups) == 2, what="resubscribed")
        assert heard.for_run(missed) == []  # only the catch-up poll can find it
        started = time.monotonic()
        fresh = await supa.admin.submit(NEW)
        await wait_for(lambda: heard.for_run(fresh), what="insert after recovery")
        latency = (heard.arrival(fresh) or 0) - started
    assert latency < 0.5
    assert len([w for w in warnings if w.startswith("realtime down")]) == 1
    resubscribed = [r for r in infos if r["message"] == "realtime resubscribed"]
    assert len(resubscribed) == 1 and float(resubscribed[0]["outage_s"]) > 0  # type: ignore[arg-type]


async def test_a_network_cut_is_repaired_and_caught_up(
    supa: SupabaseBackends, standin: StandIn, events: SupabaseEvents
) -> None:
    async with listening(events, Heard()) as heard:
        assert standin.faults.drop_websockets() == 1
        await wait_for(lambda: len(heard.catch_ups) == 2 and events.healthy, what="caught up again")
        run_id = await supa.admin.submit(NEW)
        await wait_for(lambda: heard.for_run(run_id), what="insert after the cut")


async def test_a_stalled_socket_is_noticed_by_missing_heartbeat_replies(
    supa: SupabaseBackends, standin: StandIn, events: SupabaseEvents
) -> None:
    async with listening(events, Heard()) as heard:
        connections_before = standin.realtime.joins
        standin.faults.stall_realtime(2.5)
        await wait_for(
            lambda: not events.healthy, timeout=FAST.heartbeat_interval + FAST.heartbeat_timeout + 2
        )
        await wait_for(
            lambda: len(heard.catch_ups) >= 2 and events.healthy, timeout=15, what="rebuilt after stall"
        )
        assert standin.realtime.joins > connections_before
        run_id = await supa.admin.submit(NEW)
        await wait_for(lambda: heard.for_run(run_id), what="insert after the stall")


async def test_a_channel_closed_by_the_server_is_joined_again(
    supa: SupabaseBackends, standin: StandIn, events: SupabaseEvents
) -> None:
    async with listening(events, Heard()) as heard:
        # As Realtime does when it shuts a channel down: phx_close, which the client never rejoins.
        standin.faults.close_channels()
        await wait_for(lambda: len(heard.catch_ups) == 2 and events.healthy, what="joined again")
        run_id = await supa.admin.submit(NEW)
        await wait_for(lambda: heard.for_run(run_id), what="insert after rejoin")


async def test_a_run_inserted_before_subscribed_to_postgresql_is_caught_up(
    supa: SupabaseBackends, standin: StandIn, events: SupabaseEvents
) -> None:
    standin.faults.delay_subscribed(None)  # hold "Subscribed to PostgreSQL" until released
    heard = Heard()
    async with listening(events, heard, wait=False):
        await wait_for(lambda: standin.realtime.joins >= 1, what="joined")
        early = await supa.admin.submit(NEW)  # committed between phx_reply and the system message
        assert heard.catch_ups == [] and not events.healthy
        released = time.monotonic()
        standin.faults.release_subscribed()
        await wait_for(lambda: heard.catch_ups, what="catch-up after Subscribed to PostgreSQL")
        assert heard.catch_ups[0] >= released and events.healthy
        # The catch-up poll the core runs now finds it (Realtime itself would never deliver it).
        assert early in (await supa.store.poll(10)).claimable
        late = await supa.admin.submit(NEW)
        await wait_for(lambda: heard.for_run(late), what="insert after the system message")


async def test_failing_callbacks_do_not_stop_the_stream(
    supa: SupabaseBackends, events: SupabaseEvents
) -> None:
    heard = Heard(failing=True)

    def exploding_sink(hint: Hint) -> None:
        heard.sink(hint)
        raise RuntimeError("sink failure")

    task = asyncio.create_task(events.listen(exploding_sink, heard.subscribed))
    try:
        await wait_for(lambda: heard.catch_ups, what="subscribed")
        first = await supa.admin.submit(NEW)
        second = await supa.admin.submit(NEW)
        await wait_for(lambda: heard.for_run(first) and heard.for_run(second), what="both hints")
        assert events.healthy
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_table_missing_from_the_publication_is_reported_and_recovers(
    supa: SupabaseBackends, standin: StandIn, events: SupabaseEvents, warnings: list[str]
) -> None:
    async with await psycopg.AsyncConnection.connect(standin.database_url, autocommit=True) as conn:
        await conn.execute("alter publication supabase_realtime drop table public.training_runs")
    heard = Heard()
    async with listening(events, heard, wait=False):
        await wait_for(lambda: any("Unable to subscribe" in w for w in warnings), what="the refusal logged")
        assert not events.healthy and heard.catch_ups == []
        await standin.publish("public.training_runs")  # the dashboard's Realtime toggle
        await wait_for(
            lambda: heard.catch_ups and events.healthy, timeout=15, what="subscribed once published"
        )
        run_id = await supa.admin.submit(NEW)
        await wait_for(lambda: heard.for_run(run_id), what="insert hint")
    down = [w for w in warnings if w.startswith("realtime down")]
    assert len(down) == 1
