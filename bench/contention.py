"""Claim contention: N agent processes racing for M queued runs (fake trainer, 0 s epochs).

    python bench/contention.py [--quick]

For each N (1, 4, 16, 32; --quick: 1, 4, 16) the bench makes a fresh database, starts N agents
(`python -m agent run`, default settings: MAX_CONCURRENT_RUNS=1, so an agent claims only while
its slot is free, as a fleet of one-GPU hosts would), waits until each has subscribed, then
inserts M runs in one transaction, so that they all become claimable at the same instant.

- claims_per_s: M / (time of the last claim's commit - the insert's commit), both seen by the
  bench (the claim's commit through a bench trigger's NOTIFY, as in pickup.py). With the fake
  trainer each run still spawns, runs and reaps a child process, so this is the fleet's
  throughput of tiny runs on this machine, where the agents and their children share the CPUs.
- double_claims: a bench trigger logs every claim (worker_id going from null to a value);
  any run logged more than once is a double claim. Summed over every N; must be 0.
- statements_per_claim: statements the database executed for the agents from the insert until
  every run completed (+0.5 s for the last runs' trailing writes), divided by M. Counted with
  pg_stat_statements (the bench preloads it into its own embedded server; the bench's own
  statements run under another role and are left out). This is the whole life of a run (claim,
  heartbeat, progress, final write, registry, the poll after each run) plus every attempt that
  lost a race, plus what the idle agents did meanwhile (LISTEN health pings, registry beats).
- claim_attempts_per_claim: calls of the claim UPDATE (won or lost) per run.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    FAKE_TINY,
    Bench,
    Postgres,
    Statements,
    StatusWatch,
    agent_env,
    emit,
    log,
    machine,
    parse_args,
    start_agents,
    stop_all,
)

CLAIM_SQL = r"set status = \$1,\s+worker_id = \$2,\s+started_at = now\(\),\s+heartbeat_at = now\(\)"


def race(bench: Bench, pg: Postgres, n: int, runs: int) -> tuple[dict[str, float], int]:
    db = pg.database()
    watch = StatusWatch(bench, db)
    started = time.monotonic()
    agents = start_agents(
        bench,
        n,
        lambda i: agent_env(bench.tmp / f"n{n}-a{i}", f"n{n}-a{i}", database_url=db.url),
        timeout=60 + 5 * n,
    )
    log(f"{n} agents ready in {time.monotonic() - started:.1f}s")
    stats = Statements(db)
    try:
        stats.reset()
        config = json.dumps(FAKE_TINY)
        with db.connect() as conn:
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(
                    "insert into training_runs (data_yaml, configuration) values ('fake.yaml', %s)",
                    [(config,)] * runs,
                )
            committed = time.monotonic()
        last_claim = watch.wait_count("running", runs, timeout=120 + runs)
        watch.wait_count("completed", runs, timeout=120 + runs)
        time.sleep(0.5)
        statements = stats.total()
        attempts = stats.calls_matching(CLAIM_SQL)
        top = stats.top(6)
    finally:
        stop_all(agents)
    with db.connect() as conn:
        row = conn.execute(
            "select coalesce(sum(n - 1), 0), count(*), count(distinct w) from"
            " (select run_id, count(*) as n, min(worker_id) as w from bench_claim_log group by run_id) c"
        ).fetchone()
    assert row is not None
    doubles, claimed, workers = int(row[0]), int(row[1]), int(row[2])
    if claimed != runs:
        raise RuntimeError(f"{claimed} of {runs} runs claimed")
    seconds = last_claim - committed
    result = {
        "claims_per_s": round(runs / seconds, 1),
        "statements_per_claim": round(statements / runs, 1),
        "claim_attempts_per_claim": round(attempts / runs, 2),
        "workers_that_won": workers,
    }
    log(f"N={n}: {result}, double claims {doubles}; top statements: {top}")
    return result, doubles


def main() -> None:
    args = parse_args()
    ns = (1, 4, 16) if args.quick else (1, 4, 16, 32)
    runs = 200
    started = time.monotonic()
    by_agents: dict[str, dict[str, float]] = {}
    doubles = 0
    with Bench() as bench:
        pg = Postgres(bench)
        for n in ns:
            by_agents[str(n)], d = race(bench, pg, n, runs)
            doubles += d
    emit(
        {
            "bench": "contention",
            "backend": "postgres",
            "runs_per_race": runs,
            "double_claims": doubles,
            "by_agents": by_agents,
            "met": doubles == 0,
            "wall_s": round(time.monotonic() - started, 1),
            **machine(),
        }
    )


if __name__ == "__main__":
    main()
