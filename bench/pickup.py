"""Pickup latency: from a committed INSERT to the row committed as `running` by this agent.

    python bench/pickup.py [--backend postgres|supabase] [--quick]

How it is measured. The bench inserts a queued run with the fake trainer (one epoch of 0 s) on
an autocommit connection and takes t0 = time.monotonic() as soon as the INSERT returns, that is
right after its commit. A bench-only trigger NOTIFYs every status change; a LISTEN connection in
the bench takes t1 when the claim's notification arrives, which is when the claim transaction
committed and became visible to other clients. Pickup = t1 - t0, both on this process's clock.
It includes the LISTEN delivery to the bench, so it is a little pessimistic. As a cross-check,
`server_*` gives the database's own view: clock_timestamp() inside the claim's UPDATE minus
clock_timestamp() inside the INSERT (both recorded by bench triggers); it includes the INSERT's
commit but not the claim's commit nor the delivery to the bench. `started_at - created_at` is
not used: both are transaction start times.

Why sequential. Each insert must meet an idle agent, as a run submitted to a waiting host does:
the agent runs with the default MAX_CONCURRENT_RUNS=1, and the next run is inserted only after
the previous one completed, plus a random 20-100 ms gap so that inserts never line up with the
agent's timers. POLL_INTERVAL stays at its default (60 s): pickups come from events, not the poll.

Baseline: the old script's way, simulated in this process on its own database: a poller that
every 10 s selects the claimable rows and claims each with an unconditional UPDATE. Runs are
inserted at uniformly random times over several poll periods (the poller's phase is arbitrary
for the app), and measured with the same trigger and listener; its expected p50 is about 5 s.

With --backend supabase the agent talks only to the Supabase stand-in (Realtime and PostgREST);
the bench still inserts and observes in Postgres directly: the app's insert is a committed
INSERT whichever way it arrives. The baseline's poller runs its SQL directly too (the old script
went through PostgREST; its 10 s period dominates either way).
"""

from __future__ import annotations

import random
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    FAKE_TINY,
    AgentProcess,
    Bench,
    Database,
    Postgres,
    StatusWatch,
    agent_env,
    emit,
    log,
    machine,
    ms_summary,
    parse_args,
    percentile,
)
from bench.standin import supabase_env

WORKER = "bench-pickup"
OLD_POLL_INTERVAL = 10.0
CLAIMABLE = (
    "status in ('queued', 'running') and started_at is null and worker_id is null"
    " and cancel_requested is not true"
)


def measure_agent(bench: Bench, db: Database, backend: str, runs: int) -> tuple[list[float], list[float]]:
    watch = StatusWatch(bench, db)
    env = agent_env(bench.tmp / "agent", WORKER, database_url=db.url)
    if backend == "supabase":
        env = agent_env(bench.tmp / "agent", WORKER, supabase=supabase_env(bench, db))
    agent = AgentProcess(env, bench.tmp / "agent.log").start(bench)
    log(f"agent ready in {agent.wait_ready():.2f}s ({backend})")
    rng = random.Random(5)
    latencies: list[float] = []
    ids: list[str] = []
    with db.connect() as conn:
        for i in range(runs):
            run_id, committed = db.insert_run(conn, FAKE_TINY)
            seen, worker = watch.wait(run_id, "running", timeout=30)
            if worker != WORKER:
                raise RuntimeError(f"run {run_id} claimed by {worker!r}, not this agent")
            latencies.append(seen - committed)
            ids.append(run_id)
            watch.wait(run_id, "completed", timeout=60)
            time.sleep(rng.uniform(0.02, 0.1))
            if (i + 1) % 50 == 0:
                log(f"{i + 1}/{runs} runs, p50 so far {percentile(latencies, 50) * 1000:.1f} ms")
    return latencies, server_side(db, ids)


def server_side(db: Database, ids: list[str]) -> list[float]:
    with db.connect() as conn:
        rows = conn.execute(
            "select extract(epoch from c.at - i.at) from bench_claim_log c"
            " join bench_insert_log i using (run_id) where c.run_id = any(%s::uuid[])",
            (ids,),
        ).fetchall()
    return [float(r[0]) for r in rows]


def measure_old_poller(bench: Bench, db: Database, runs: int, periods: int) -> list[float]:
    """The old script's loop: every 10 s, select claimable rows and claim them unconditionally."""
    watch = StatusWatch(bench, db)
    stop = threading.Event()

    def poller() -> None:
        with db.connect() as conn:
            while not stop.wait(OLD_POLL_INTERVAL):
                found = conn.execute(f"select id from training_runs where {CLAIMABLE} order by created_at")
                for (run_id,) in found.fetchall():
                    conn.execute(
                        "update training_runs set status = 'running', worker_id = 'old-script',"
                        " started_at = now() where id = %s",
                        (run_id,),
                    )

    thread = threading.Thread(target=poller, name="old-poller", daemon=True)
    rng = random.Random(10)
    start = time.monotonic()
    thread.start()
    offsets = sorted(rng.uniform(0, periods * OLD_POLL_INTERVAL) for _ in range(runs))
    inserted: list[tuple[str, float]] = []
    try:
        with db.connect() as conn:
            for offset in offsets:
                time.sleep(max(0.0, start + offset - time.monotonic()))
                inserted.append(db.insert_run(conn, FAKE_TINY))
        return [
            watch.wait(run_id, "running", timeout=3 * OLD_POLL_INTERVAL)[0] - t0 for run_id, t0 in inserted
        ]
    finally:
        stop.set()
        thread.join(timeout=OLD_POLL_INTERVAL + 5)


def main() -> None:
    args = parse_args(backends=True)
    runs = 200 if args.quick else 500
    baseline_runs, periods = (20, 2) if args.quick else (200, 10)
    started = time.monotonic()
    with Bench() as bench:
        pg = Postgres(bench)
        latencies, server = measure_agent(bench, pg.database(), args.backend, runs)
        log(f"baseline: {baseline_runs} runs over {periods} polls of {OLD_POLL_INTERVAL:.0f}s")
        baseline = measure_old_poller(bench, pg.database(), baseline_runs, periods)
    result = {
        "bench": "pickup",
        "backend": args.backend,
        "runs": len(latencies),
        **ms_summary(latencies),
        **ms_summary(server, prefix="server_", qs=(50, 99)),
        "baseline_runs": len(baseline),
        **ms_summary(baseline, prefix="baseline_"),
        "target_p50_ms": 30,
        "target_p99_ms": 150,
        "met": percentile(latencies, 50) <= 0.030 and percentile(latencies, 99) <= 0.150,
        "wall_s": round(time.monotonic() - started, 1),
        **machine(),
    }
    emit(result)


if __name__ == "__main__":
    main()
