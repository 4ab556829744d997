"""The supabase backend on today's Supabase: filtered bindings, a stream that proves it is alive,
the server's complaints reported, and a missing grant named."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from loguru import logger

from agent.backends.supabase import (
    SupabaseBackends,
    SupabaseEvents,
    connect_client,
    open_supabase,
    realtime_factory,
)
from agent.backends.supabase.transport import http_client
from agent.core.agent import Agent
from agent.domain.errors import MissingPrivilege
from agent.domain.run import Lease, NewRun, WorkerInfo, WorkerState
from agent.domain.status import WorkerStatus
from tests.standin import StandIn
from tests.standin.quota import EventQuota
from tests.supabase.harness import FAST, settings_for
from tests.supabase.test_events import Heard, listening
from tests.util import wait_for

NEW = NewRun("/data/a.yaml", "YOLOv8n", {"epochs": 1})
ME = WorkerInfo("w1", "host-a", (), "test", 1)


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    messages: list[str] = []
    sink = logger.add(lambda m: messages.append(m.record["message"]), level="WARNING", diagnose=False)
    yield messages
    logger.remove(sink)


async def make_events(
    standin: StandIn, worker_id: str = "w1", echo_within: float | None = None
) -> SupabaseEvents:
    http = http_client()
    client = await connect_client(standin.url, standin.service_role_key, http)
    return SupabaseEvents(
        realtime_factory(client, max_retries=2, initial_backoff=0.05),
        topic=f"t-{worker_id}",
        worker_id=worker_id,
        echo_within=echo_within,
        tuning=FAST,
    )


@pytest.fixture
async def events(standin: StandIn) -> AsyncIterator[SupabaseEvents]:
    yield await make_events(standin)


async def sql(standin: StandIn, statement: str, params: list[Any] | None = None) -> None:
    async with await psycopg.AsyncConnection.connect(standin.database_url, autocommit=True) as conn:
        await conn.execute(statement, params or [])


async def test_other_agents_progress_never_reaches_this_agent(
    supa: SupabaseBackends, standin: StandIn, events: SupabaseEvents
) -> None:
    async with listening(events, Heard()) as heard:
        theirs = await supa.admin.submit(NEW)
        await wait_for(lambda: heard.for_run(theirs), what="the insert")
        standin.realtime.quota.reset()
        claim = await supa.store.claim(theirs, "w2")
        assert claim is not None
        for epoch in range(5):
            assert await supa.store.touch(claim.lease, {"progress": {"epoch": epoch}})
        marker = await supa.admin.submit(NEW)
        await wait_for(lambda: heard.for_run(marker), what="the next insert, after their writes")
        assert [h.op for h in heard.for_run(theirs)] == ["INSERT"]
        # Realtime counted the marker's insert for this channel, and nothing of their run.
        assert standin.realtime.quota.counted == 1


async def test_a_requeue_of_my_run_is_heard_through_the_queued_binding(
    supa: SupabaseBackends, standin: StandIn, events: SupabaseEvents
) -> None:
    run_id = await supa.admin.submit(NEW)
    claim = await supa.store.claim(run_id, "w1")
    assert claim is not None
    async with listening(events, Heard()) as heard:
        # Rescued by another agent: worker_id goes to null with status queued, then another claims it.
        await sql(
            standin,
            "update training_runs set heartbeat_at = now() - interval '1 hour' where id = %s",
            [run_id],
        )
        report = await supa.store.rescue_stale(60, 3)
        assert report.requeued == (run_id,)
        hints = await wait_for(lambda: heard.for_run(run_id), what="the requeue")
    assert hints[0].worker_id is None and hints[0].claimable


async def test_a_cancel_of_an_unclaimed_run_as_the_app_writes_it_is_heard(
    supa: SupabaseBackends, standin: StandIn, events: SupabaseEvents
) -> None:
    async with listening(events, Heard()) as heard:
        run_id = await supa.admin.submit(NEW)
        await wait_for(lambda: heard.for_run(run_id), what="the insert")
        await sql(
            standin,
            "update training_runs set status = 'canceling', cancel_requested = true where id = %s",
            [run_id],
        )
        hints = await wait_for(lambda: len(heard.for_run(run_id)) == 2 and heard.for_run(run_id))
    assert hints[1].cancel_requested and hints[1].worker_id is None


async def held(supa: SupabaseBackends, events: SupabaseEvents, heard: Heard) -> tuple[str, Lease]:
    """A run claimed by w1 and followed, its feed up (its CHECK heard)."""
    run_id = await supa.admin.submit(NEW)
    claim = await supa.store.claim(run_id, "w1")
    assert claim is not None
    events.follow(frozenset({run_id}))
    await wait_for(lambda: [h for h in heard.for_run(run_id) if h.op == "CHECK"], what="the feed up")
    return run_id, claim.lease


async def test_a_held_run_claimed_by_another_worker_is_heard_at_once(
    supa: SupabaseBackends, standin: StandIn, events: SupabaseEvents
) -> None:
    async with listening(events, Heard()) as heard:
        run_id, lease = await held(supa, events, heard)
        standin.realtime.quota.reset()
        assert await supa.store.touch(lease, {"progress": {"epoch": 1}})
        # The old script's claim: unconditional, the new row names only the other worker.
        await sql(
            standin,
            "update training_runs set status = 'running', worker_id = 'old-script', started_at = now()"
            " where id = %s",
            [run_id],
        )
        taken = time.monotonic()
        hints = await wait_for(lambda: [h for h in heard.for_run(run_id) if h.worker_id == "old-script"])
        latency = next(t for t, h in heard.hints if h.worker_id == "old-script") - taken
    # The progress write is no hint (the INSERT may come before or after the CHECK).
    assert [h.op for h in heard.for_run(run_id) if h.op != "INSERT"] == ["CHECK", "UPDATE"]
    assert hints[0].status is not None and hints[0].status.value == "running"
    assert latency < 0.5, f"takeover heard after {latency:.3f}s"
    # One event per write of the held run, as the echo of `worker_id=eq.<me>` cost before.
    assert standin.realtime.quota.counted == 2


async def test_a_run_no_longer_held_has_no_feed_and_costs_nothing(
    supa: SupabaseBackends, standin: StandIn, events: SupabaseEvents
) -> None:
    async with listening(events, Heard()) as heard:
        run_id, lease = await held(supa, events, heard)
        assert events.feeds == {run_id: True}
        events.follow(frozenset())
        await wait_for(lambda: events.feeds == {}, what="the feed left")
        await wait_for(lambda: standin.realtime.joins and _channels(standin) == 1, what="left on the server")
        standin.realtime.quota.reset()
        assert await supa.store.touch(lease, {"progress": {"epoch": 2}})
        await sql(standin, "update training_runs set worker_id = 'old-script' where id = %s", [run_id])
        marker = await supa.admin.submit(NEW)
        await wait_for(lambda: heard.for_run(marker), what="a later insert")
    assert [h.op for h in heard.for_run(run_id) if h.op != "INSERT"] == ["CHECK"]
    assert standin.realtime.quota.counted == 1  # the marker's insert


def _channels(standin: StandIn) -> int:
    """Channels joined on the server, over all its connections."""
    return sum(len(conn.channels) for conn in standin.realtime._connections)


async def test_the_feeds_of_held_runs_are_joined_again_after_a_rebuild_each_with_a_check(
    supa: SupabaseBackends, standin: StandIn, events: SupabaseEvents
) -> None:
    async with listening(events, Heard()) as heard:
        run_id, _ = await held(supa, events, heard)
        assert standin.faults.close_channels() == 2
        await wait_for(
            lambda: len([h for h in heard.for_run(run_id) if h.op == "CHECK"]) == 2,
            timeout=10,
            what="the feed joined again, with a CHECK for what it missed",
        )
        assert events.feeds == {run_id: True} and events.healthy
        await sql(standin, "update training_runs set worker_id = 'old-script' where id = %s", [run_id])
        await wait_for(lambda: [h for h in heard.for_run(run_id) if h.worker_id == "old-script"])


async def test_a_dropped_subscription_is_noticed_by_the_missing_echo_and_healed(
    supa: SupabaseBackends, standin: StandIn, warnings: list[str]
) -> None:
    heartbeat = 0.5
    events = await make_events(standin, echo_within=3 * heartbeat)

    async def registry() -> None:
        # The agent's registry: its own row, every HEARTBEAT_INTERVAL.
        while True:
            await supa.store.register_worker(ME, WorkerState(WorkerStatus.ONLINE, ()))
            await asyncio.sleep(heartbeat)

    writer = asyncio.create_task(registry())
    try:
        async with listening(events, Heard()) as heard:
            await wait_for(lambda: events.echoes >= 2, what="echoes of the registry row")
            assert events.healthy
            dropped_at = time.monotonic()
            assert standin.faults.drop_subscriptions() == 5
            await wait_for(lambda: not events.healthy, timeout=5, what="the silent stream noticed")
            noticed = time.monotonic() - dropped_at
            await wait_for(lambda: len(heard.catch_ups) >= 2 and events.healthy, timeout=10, what="healed")
            run_id = await supa.admin.submit(NEW)
            await wait_for(lambda: heard.for_run(run_id), what="an insert after healing")
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
    assert noticed <= 3 * heartbeat + 1.0
    assert any("own writes came back" in p for p in events.problems)
    assert sum("own writes came back" in w for w in warnings) == 1


async def test_error_401_changes_are_reported_once_in_the_servers_words(
    supa: SupabaseBackends, standin: StandIn, events: SupabaseEvents, warnings: list[str]
) -> None:
    async with listening(events, Heard()):
        await sql(standin, "revoke select on training_runs from service_role")
        for _ in range(3):
            await sql(standin, "insert into training_runs (status) values ('queued')")
        await wait_for(lambda: events.problems, what="the 401 reported")
    assert events.problems == ("public.training_runs: Error 401: Unauthorized",)
    assert sum("Error 401" in w for w in warnings) == 1


async def test_a_private_only_project_is_reported(standin: StandIn, events: SupabaseEvents) -> None:
    standin.realtime.private_only = True
    async with listening(events, Heard(), wait=False):
        await wait_for(lambda: events.problems, what="the refusal reported")
    assert (
        events.problems[0] == "channel CHANNEL_ERROR: PrivateOnly: This project only allows private channels"
    )


async def test_a_missing_grant_is_named_with_its_fix(supa: SupabaseBackends, standin: StandIn) -> None:
    run_id = await supa.admin.submit(NEW)
    await sql(standin, "revoke update on training_runs from service_role")
    with pytest.raises(MissingPrivilege) as denied:
        await supa.store.claim(run_id, "w1")
    assert denied.value.role == "service_role" and denied.value.table == "public.training_runs"
    message = str(denied.value)
    assert "the table public.training_runs exists but role service_role has no SELECT/UPDATE on it" in message
    assert "grant select, update on public.training_runs to service_role" in message


async def test_a_denial_by_a_trigger_names_the_other_table(supa: SupabaseBackends, standin: StandIn) -> None:
    run_id = await supa.admin.submit(NEW)
    await sql(
        standin,
        """
        create table side_log (run_id uuid);
        create function log_side() returns trigger language plpgsql as $$
        begin insert into side_log values (new.id); return null; end $$;
        create trigger log_side after update on training_runs for each row execute function log_side();
        """,
    )
    with pytest.raises(MissingPrivilege) as denied:
        await supa.store.claim(run_id, "w1")
    assert denied.value.table == "public.side_log"
    assert "a trigger or a policy of public.training_runs" in str(denied.value)


async def test_startup_names_the_missing_grant_not_a_missing_schema(standin: StandIn, tmp_path: Path) -> None:
    await sql(standin, "revoke select on trainer_workers from service_role")
    with pytest.raises(MissingPrivilege) as denied:
        await open_supabase(settings_for(standin, tmp_path / "agent"), tuning=FAST)
    assert "trainer_workers exists but role service_role has no SELECT" in str(denied.value)
    assert "apply the saturnos-agent schema" not in str(denied.value)


@dataclass
class Running:
    agent: Agent
    backends: SupabaseBackends
    events: SupabaseEvents
    worker_id: str
    task: asyncio.Task[str]


@asynccontextmanager
async def running_agent(standin: StandIn, data_dir: Path, **overrides: Any) -> AsyncIterator[Running]:
    """The real agent loop on the stand-in: heartbeats every 0.5 s, a poll only every 10 min."""
    from agent.wiring import build_agent

    defaults: dict[str, Any] = {"poll_interval": 600.0, "heartbeat_interval": 0.5, "stale_after": 30.0}
    settings = settings_for(standin, data_dir, offline=True, **{**defaults, **overrides})
    backends = await open_supabase(settings, tuning=FAST)
    agent = build_agent(settings, backends, offline=True)
    task = asyncio.create_task(agent.run())
    events = backends.events
    assert isinstance(events, SupabaseEvents)
    try:
        await wait_for(lambda: agent.ready.is_set(), what="agent ready")
        yield Running(agent, backends, events, settings.worker_id, task)
    finally:
        agent.stop("test over")
        try:
            await asyncio.wait_for(task, timeout=30)
        finally:
            await backends.close()


def fake_run(seconds: float) -> NewRun:
    return NewRun("/unused.yaml", "YOLOv8n", {"trainer": "fake", "epochs": 1, "fakeEpochSeconds": seconds})


async def test_an_idle_agent_heals_a_dropped_subscription_within_three_heartbeats(
    standin: StandIn, tmp_path: Path
) -> None:
    heartbeat = 0.5
    # Only Realtime, or the degraded poll while it is down, picks runs up.
    async with running_agent(standin, tmp_path / "agent", degraded_poll_interval=0.5) as r:
        await wait_for(lambda: r.events.echoes >= 1, what="echo of the registry")
        dropped_at = time.monotonic()
        standin.faults.drop_subscriptions()
        await wait_for(lambda: not r.events.healthy, timeout=10, what="the dead stream noticed")
        noticed = time.monotonic() - dropped_at
        await wait_for(lambda: r.events.subscriptions >= 2 and r.events.healthy, timeout=10, what="healed")
        run_id = await r.backends.admin.submit(fake_run(0.1))

        async def claimed() -> bool:
            row = await r.backends.admin.get(run_id)
            return row is not None and row.worker_id == r.worker_id

        await wait_for(claimed, timeout=5, what="a run picked up after healing")
    assert noticed <= 3 * heartbeat + 1.0, f"noticed after {noticed:.2f}s"


async def test_an_agent_holding_a_run_stops_at_once_and_its_stream_stays_alive_until_then(
    standin: StandIn, tmp_path: Path, warnings: list[str]
) -> None:
    async with running_agent(standin, tmp_path / "agent", shutdown_mode="release") as r:
        run_id = await r.backends.admin.submit(fake_run(60))
        await wait_for(lambda: r.events.feeds.get(run_id), timeout=10, what="the run's feed up")
        echoes = r.events.echoes
        await wait_for(lambda: r.events.echoes >= echoes + 3, timeout=10, what="registry echoes while busy")
        # The run ends (its feed is left) in the same moment the watchdog is told to stop.
        r.agent.stop("test over")
        await asyncio.wait_for(r.task, timeout=10)
    async with await psycopg.AsyncConnection.connect(standin.database_url) as conn:
        cur = await conn.execute("select status, worker_id from training_runs where id = %s", [run_id])
        assert await cur.fetchone() == ("queued", None)
    assert not [w for w in warnings if "own writes came back" in w]


def _agent_channels(standin: StandIn) -> list[str]:
    """Topics joined on the server by agents (not by a test's own clients)."""
    return sorted(
        topic
        for conn in standin.realtime._connections
        for topic in conn.channels
        if topic.startswith("realtime:saturnos-agent:")
    )


async def test_a_channel_past_the_per_client_cap_is_refused_as_realtime_refuses_it(
    standin: StandIn, events: SupabaseEvents, warnings: list[str]
) -> None:
    standin.realtime.max_channels_per_client = 1  # the agent's own channel is the one allowed
    async with listening(events, Heard()) as heard:
        events.follow(frozenset({"5f0c1d2e-0000-4000-8000-000000000001"}))
        await wait_for(lambda: any("Too many channels" in p for p in events.problems), what="refusal")
        assert events.healthy and not [h for h in heard.hints if h.op == "CHECK"]
    assert any("ChannelRateLimitReached: Too many channels" in w for w in warnings)


async def test_an_agent_serving_run_after_run_keeps_one_channel_plus_one_per_held_run(
    standin: StandIn, tmp_path: Path
) -> None:
    # Realtime refuses a socket's channel past its cap: a feed left behind would soon hit it.
    standin.realtime.max_channels_per_client = 2
    most = 0
    async with running_agent(standin, tmp_path / "agent") as r:
        for _ in range(6):
            run_id = await r.backends.admin.submit(fake_run(0.3))
            await wait_for(lambda run_id=run_id: r.events.feeds.get(run_id), timeout=10, what="its feed up")
            most = max(most, len(_agent_channels(standin)))

            async def done(run_id: str = run_id) -> bool:
                row = await r.backends.admin.get(run_id)
                return row is not None and row.status.value == "completed"

            await wait_for(done, timeout=20, what="the run completed")
        await wait_for(lambda: len(_agent_channels(standin)) == 1, what="only the agent's own channel left")
    assert most == 2
    assert not [p for p in r.events.problems if "Too many channels" in p]


async def test_an_agent_over_the_join_rate_is_disconnected_then_heals_and_follows_its_run(
    standin: StandIn, tmp_path: Path
) -> None:
    async with running_agent(standin, tmp_path / "agent", degraded_poll_interval=0.5) as r:
        # From now on the project is over its joins per second for about 2 s: the next join (this
        # run's channel) is refused and the agent's socket disconnected, as Realtime does.
        standin.realtime.join_rate = EventQuota(1.0, tick=0.5, window=4)
        standin.realtime.join_rate.add(10)
        await wait_for(lambda: standin.realtime.join_rate.triggered, what="over the rate at the next tick")
        run_id = await r.backends.admin.submit(fake_run(6))
        await wait_for(
            lambda: any("ClientJoinRateLimitReached" in p for p in r.events.problems), what="the refusal"
        )
        await wait_for(
            lambda: r.events.healthy and r.events.feeds.get(run_id), timeout=30, what="healed, run followed"
        )
        await sql(
            standin,
            "update training_runs set status = 'running', worker_id = 'old-script' where id = %s",
            [run_id],
        )
        await wait_for(lambda: r.agent.runs.get(run_id) is None, timeout=10, what="the run dropped")
    async with await psycopg.AsyncConnection.connect(standin.database_url) as conn:
        cur = await conn.execute("select status, worker_id from training_runs where id = %s", [run_id])
        assert await cur.fetchone() == ("running", "old-script")
