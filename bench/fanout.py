"""Realtime fan-out: how many events a fleet of agents costs the project, against its quota.

    python bench/fanout.py [--quick]

N agents (20 quick, 50 full) each train a run on the Supabase stand-in, writing progress every
PROGRESS_INTERVAL, while one web-app client follows one run. The stand-in runs as its own process
with Realtime's event counter on at Pro's quota (500 events/s): one count per subscription a
change is sent to, and every change skipped while the sliding average is over the quota.

The agents run in this process, on one event loop, each with its own supabase backend (HTTP
client, Realtime socket, filtered bindings) and the real agent loop and progress writer; only the
trainer is an in-process stand-in for the child (a timer that reports batches), so that 50 agents
fit on two cores. In the same run the stand-in also counts what today's unfiltered bindings
(INSERT and UPDATE of every run, for every agent) would have cost on the same changes.

Prints JSON: agents, counted_events_per_s (as Realtime counts them), unfiltered_counted_events_per_s,
ratio (unfiltered / filtered), skipped_changes (0: the quota was never crossed), and the pieces.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg import sql

from agent.domain.messages import BatchProgress, Started, Stopped, TrainerMessage
from agent.ports import ChildExit, TrainJob
from bench.common import Bench, Database, emit, log, parse_args

PRO_QUOTA = 500.0
BATCH_SECONDS = 0.5  # the fake trainer reports a batch this often; the agent writes every PROGRESS_INTERVAL
_pids = itertools.count(4_000_000)


class TimerTraining:
    """A training that reports a batch every BATCH_SECONDS until stopped: the child's messages, in-process."""

    def __init__(self, job: TrainJob) -> None:
        self.pid = next(_pids)  # never signalled: the bench stops agents, not children
        self._epochs = job.request.epochs
        self._stop = asyncio.Event()

    async def messages(self) -> AsyncIterator[TrainerMessage]:
        yield Started(total_epochs=self._epochs, note="bench timer")
        batch = 0
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(BATCH_SECONDS):
                    await self._stop.wait()
            batch += 1
            yield BatchProgress(1, self._epochs, batch, 1_000_000, {"box_loss": 1.0 / batch})
        yield Stopped()

    async def stop(self, reason: str) -> ChildExit:
        self._stop.set()
        return ChildExit(0, True, ())

    async def wait(self) -> ChildExit:
        await self._stop.wait()
        return ChildExit(0, True, ())


class TimerTrainer:
    async def start(self, job: TrainJob) -> TimerTraining:
        return TimerTraining(job)


async def start_agents(url: str, key: str, n: int, data: Path) -> list[tuple[Any, Any, asyncio.Task[str]]]:
    from agent.backends.supabase import open_supabase
    from agent.config import Settings
    from agent.wiring import build_agent

    started = []
    for i in range(n):
        settings = Settings(
            supabase_url=url,
            supabase_service_role_key=key,
            data_dir=data / f"agent-{i}",
            worker_id=f"fanout-{i:03d}",
            offline=True,
            shutdown_mode="release",  # at the end, stop the endless runs and put them back
            allow_fake_trainer=True,  # the runs ask for the fake trainer; the timer above stands in for it
            agent_secret="fanout-bench",
        )
        backends = await open_supabase(settings)
        agent = build_agent(settings, backends, offline=True)
        agent.deps = dataclasses.replace(agent.deps, trainer=TimerTrainer())
        task = asyncio.create_task(agent.run(), name=f"agent-{i}")
        started.append((agent, backends, task))
        await asyncio.wait_for(agent.ready.wait(), timeout=60)
    return started


async def web_app(url: str, anon_key: str, run_id: str, received: list[float]) -> Any:
    """The app's page of one run: UPDATEs of that run, with the anon key."""
    from realtime import AsyncRealtimeClient, RealtimePostgresChangesListenEvent

    client = AsyncRealtimeClient(f"{url}/realtime/v1", anon_key)
    channel = client.channel(f"run-{run_id}")
    channel.on_postgres_changes(
        RealtimePostgresChangesListenEvent.Update,
        lambda _payload: received.append(time.monotonic()),
        table="training_runs",
        schema="public",
        filter=f"id=eq.{run_id}",
    )
    await channel.subscribe()
    return client


def insert_runs(db_url: str, n: int) -> list[str]:
    config = json.dumps({"trainer": "fake", "epochs": 1000})
    with psycopg.connect(db_url, autocommit=True) as conn:
        rows = conn.execute(
            "insert into training_runs (status, data_yaml, base_model, configuration)"
            " select 'queued', '/data/fake.yaml', 'YOLOv8n', %s::jsonb from generate_series(1, %s)"
            " returning id",
            [config, n],
        ).fetchall()
    return [str(r[0]) for r in rows]


def running(db_url: str) -> int:
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute("select count(*) from training_runs where status = 'running'").fetchone()
    return int(row[0]) if row else 0


async def measure(args: Any, bench: Bench, db: Database, info: dict[str, str]) -> dict[str, Any]:
    n = 20 if args.quick else 50
    window = 30.0 if args.quick else 60.0
    url, key = info["url"], info["service_role_key"]
    control = httpx.AsyncClient(base_url=f"{url}/_standin/realtime", timeout=10)
    agents: list[tuple[Any, Any, asyncio.Task[str]]] = []
    app_client = None
    try:
        log(f"starting {n} agents in-process")
        agents = await start_agents(url, key, n, bench.tmp / "agents")
        runs = insert_runs(db.url, n)
        deadline = time.monotonic() + 120
        while running(db.url) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {running(db.url)} of {n} runs running after 120 s")
            await asyncio.sleep(0.5)
        received: list[float] = []
        app_client = await web_app(url, info["anon_key"], runs[0], received)
        await asyncio.sleep(2.0)  # the app's "Subscribed to PostgreSQL"
        # Today's bindings, for the same changes: INSERT and UPDATE of every run, for every agent.
        shadow = [{"event": e, "schema": "public", "table": "training_runs"} for e in ("INSERT", "UPDATE")]
        await control.post("/shadow", json={"params": shadow, "copies": n})
        await control.post("/quota/reset")
        app_seen_from = len(received)
        log(f"{n} runs training; measuring for {window:.0f} s")
        await asyncio.sleep(window)
        quota = (await control.get("/quota")).json()
        app_events = len(received) - app_seen_from
        elapsed = float(quota["elapsed"])
        counted = quota["counted"] / elapsed
        unfiltered = (quota["shadow_counted"] + app_events) / elapsed
        with psycopg.connect(db.url, autocommit=True) as conn:
            still = conn.execute("select count(*) from training_runs where status = 'running'").fetchone()
        healthy = sum(1 for agent, _, _ in agents if agent.events.healthy)
        return {
            "agents": n,
            "window_s": round(elapsed, 1),
            "counted_events_per_s": round(counted, 1),
            "unfiltered_counted_events_per_s": round(unfiltered, 1),
            "ratio": round(unfiltered / counted, 1) if counted else None,
            "skipped_changes": quota["skipped_changes"],
            "quota_events_per_s": PRO_QUOTA,
            "unfiltered_over_quota": unfiltered > PRO_QUOTA,
            "web_app_events": app_events,
            "runs_running": int(still[0]) if still else 0,
            "agents_healthy": healthy,
        }
    finally:
        if app_client is not None:
            await app_client.close()
        for agent, _, _ in agents:
            agent.stop("benchmark over")
        if agents:
            await asyncio.wait([task for _, _, task in agents], timeout=60)
        for _, backends, task in agents:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            with contextlib.suppress(BaseException):
                await backends.close()
        await control.aclose()


def main() -> None:
    args = parse_args()
    from bench.standin import start_standin
    from tests.pg import TestPostgres

    with Bench() as bench:
        pg = TestPostgres.start()
        bench.callback(pg.stop)
        db = Database(pg.new_database("fanout"))
        with psycopg.connect(db.url, autocommit=True) as conn:
            exists = conn.execute("select 1 from pg_roles where rolname = 'bench'").fetchone()
            if exists is None:
                conn.execute(sql.SQL("create role {} login superuser").format(sql.Identifier("bench")))
        info = start_standin(bench, db, extra=("--max-events-per-second", str(PRO_QUOTA)))
        from loguru import logger

        logger.remove()
        logger.add(sys.stderr, level="WARNING", diagnose=False)
        result = asyncio.run(measure(args, bench, db, info))
    emit(result)


if __name__ == "__main__":
    main()
