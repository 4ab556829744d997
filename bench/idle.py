"""One idle agent: what it costs the database and the host to wait for work, and how fast it starts.

    python bench/idle.py [--backend postgres|supabase] [--quick]

- ready_s: from the bench's spawn of `python -m agent run` to the time stamp of its log line
  "event stream subscribed: catch-up poll" (the agent's own clock; same host). It includes the
  interpreter start, imports, the idempotent schema migration and the first LISTEN/subscribe.
- statements_per_min: statements the database executed for the agent over the idle window
  (60 s, --quick 20 s), from pg_stat_statements (see bench/common.py), per minute. With the
  supabase backend the agent never talks to the database: it is the agent's REST requests per
  minute (PostgREST runs each as one statement); standin_statements_per_min is everything the
  stand-in executed meanwhile (each request's transaction and settings, and its change feed,
  which on Supabase is Realtime's own work whatever the number of agents).
- cpu_s: user + system CPU seconds of the agent process during the idle window (psutil);
  startup_cpu_s: the same from its start to ready.
- rss_mb: resident memory of the agent process at the end (must stay ≤ 150 MB: the parent never
  imports torch); torch_loaded: whether any torch library is mapped into the process.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil

from bench.common import (
    AgentProcess,
    Bench,
    Postgres,
    Statements,
    agent_env,
    emit,
    log,
    machine,
    parse_args,
)
from bench.standin import supabase_env

WORKER = "bench-idle"


def torch_loaded(pid: int) -> bool:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return "libtorch" in maps or "/torch/" in maps


def main() -> None:
    args = parse_args(backends=True)
    window = 20.0 if args.quick else 60.0
    started = time.monotonic()
    with Bench() as bench:
        pg = Postgres(bench)
        db = pg.database()
        if args.backend == "supabase":
            env = agent_env(bench.tmp / "agent", WORKER, supabase=supabase_env(bench, db))
        else:
            env = agent_env(bench.tmp / "agent", WORKER, database_url=db.url)
        stats = Statements(db)
        agent = AgentProcess(env, bench.tmp / "agent.log").start(bench)
        proc = psutil.Process(agent.pid)
        ready_s = agent.wait_ready()
        cpu0 = proc.cpu_times()
        stats.reset()
        log(f"ready in {ready_s:.2f}s; idle for {window:.0f}s")
        time.sleep(window)
        statements = stats.total()
        rest = stats.on_app_tables()
        cpu1 = proc.cpu_times()
        rss_mb = proc.memory_info().rss / 2**20
        torch = torch_loaded(agent.pid)
        top = stats.top(6)
    log(f"top statements: {top}")
    per_min = 60 / window
    result = {
        "bench": "idle",
        "backend": args.backend,
        "window_s": window,
        "statements_per_min": round((rest if args.backend == "supabase" else statements) * per_min, 1),
        "cpu_s": round((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system), 2),
        "startup_cpu_s": round(cpu0.user + cpu0.system, 2),
        "rss_mb": round(rss_mb, 1),
        "ready_s": round(ready_s, 2),
        "torch_loaded": torch,
        "target_rss_mb": 150,
        "target_ready_s": 3,
        "met": rss_mb <= 150 and ready_s <= 3 and not torch,
        "wall_s": round(time.monotonic() - started, 1),
        **machine(),
    }
    if args.backend == "supabase":
        result["standin_statements_per_min"] = round(statements * per_min, 1)
    emit(result)


if __name__ == "__main__":
    main()
