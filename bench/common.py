"""Shared helpers of the benchmarks: a real Postgres, agents as OS processes, probes, percentiles.

Every benchmark script prints one JSON object on its last line (`emit`). Everything a script
starts (the embedded Postgres, agents, the Supabase stand-in, helper processes) is registered on
a `Bench` (an ExitStack) and stopped when the script ends, fails, or gets SIGTERM/SIGINT.

Measuring, not trusting logs:
- `StatusWatch` LISTENs on a channel fed by a bench-only trigger on `training_runs` that
  NOTIFYs every status change (id, status, worker). A notification is delivered when the writing
  transaction commits, so "received" is "committed and visible to another client", timestamped
  with this process's monotonic clock, the same clock that timestamps the bench's own commits.
- `Statements` counts the statements the database executed for the agents, with
  `pg_stat_statements` (the bench preloads it into its own server). The bench connects as its own
  role (`bench`) so that its inserts, probes and resets are left out of the count.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402

T = TypeVar("T")
PYTHON = sys.executable
BENCH_ROLE = "bench"
STATUS_CHANNEL = "bench_status"
READY_MESSAGE = "event stream subscribed: catch-up poll"
FAKE_TINY = {"trainer": "fake", "epochs": 1, "fakeEpochSeconds": 0.0, "fakeBatches": 1}


# Output and statistics ------------------------------------------------------------------------


def log(message: str) -> None:
    """Progress for the human watching; stderr, so the JSON stays the last line of stdout."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def emit(result: dict[str, Any]) -> None:
    print(json.dumps(result), flush=True)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between ranks, like numpy's default."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def ms_summary(
    seconds: Sequence[float], prefix: str = "", qs: Sequence[int] = (50, 95, 99)
) -> dict[str, float]:
    """{prefix}p50_ms … and {prefix}max_ms, rounded to 0.1 ms."""
    out = {f"{prefix}p{q}_ms": round(percentile(seconds, q) * 1000, 1) for q in qs}
    out[f"{prefix}max_ms"] = round(max(seconds) * 1000, 1) if seconds else math.nan
    return out


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.01) -> T:
    """Poll `predicate` until truthy; raise TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout:.0f}s: {what}")
        time.sleep(interval)


def parse_args(
    argv: Sequence[str] | None = None, backends: bool = False, flags: dict[str, str] | None = None
) -> Any:
    """--quick, --backend when `backends`, and the on/off `flags` (name: help) of one script."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="the short variant (each script < 5 min)")
    if backends:
        p.add_argument("--backend", choices=("postgres", "supabase"), default="postgres")
    for name, help_ in (flags or {}).items():
        p.add_argument(name, action="store_true", help=help_)
    return p.parse_args(argv)


# Lifetime -------------------------------------------------------------------------------------


class Bench(contextlib.ExitStack):
    """Owns a scratch folder and every process a benchmark starts; SIGTERM cleans up too."""

    def __enter__(self) -> Bench:
        super().__enter__()
        self.tmp = Path(tempfile.mkdtemp(prefix="saturnos-bench-"))
        if not os.environ.get("BENCH_KEEP"):
            self.callback(_rmtree, self.tmp)
        previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _exit_on_signal)
        self.callback(signal.signal, signal.SIGTERM, previous)
        return self


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def kill_group(proc: subprocess.Popen[Any], term_timeout: float = 10.0) -> None:
    """SIGTERM the process (its own session), wait, then SIGKILL its whole group."""
    if proc.poll() is None:
        started = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=term_timeout)
        if time.monotonic() - started > 2:
            log(f"{proc.args!r:.80} took {time.monotonic() - started:.1f}s to stop")
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def pid_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting for its parent to reap it counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat[stat.rfind(b")") + 2 :][:1] not in (b"Z", b"X")


# Postgres -------------------------------------------------------------------------------------


class Postgres:
    """An embedded Postgres for one benchmark, with pg_stat_statements and room for many agents."""

    def __init__(self, bench: Bench, max_connections: int = 400) -> None:
        from agent.backends.postgres.embedded import start_embedded
        from tests.pg import TestPostgres

        pgdata = bench.tmp / "pgdata"
        # First start: initdb, then settings that need a restart (preloaded library, connections).
        first = start_embedded(pgdata, cleanup="stop")
        try:
            with psycopg.connect(first.url(), autocommit=True) as conn:
                conn.execute("alter system set shared_preload_libraries = 'pg_stat_statements'")
                conn.execute(sql.SQL("alter system set max_connections = {}").format(max_connections))
                conn.execute("alter system set pg_stat_statements.track_utility = on")
        finally:
            first.stop()
        server = start_embedded(pgdata, cleanup="delete")
        bench.callback(server.stop)
        # TestPostgres makes the migrated template and fresh databases from it; given a URL it
        # uses that server instead of starting its own.
        saved = os.environ.get("TEST_DATABASE_URL")
        os.environ["TEST_DATABASE_URL"] = server.url()
        try:
            self.pg = TestPostgres.start()
        finally:
            if saved is None:
                os.environ.pop("TEST_DATABASE_URL", None)
            else:
                os.environ["TEST_DATABASE_URL"] = saved
        with psycopg.connect(server.url(), autocommit=True) as conn:
            conn.execute(sql.SQL("create role {} login superuser").format(sql.Identifier(BENCH_ROLE)))

    def database(self, *, migrated: bool = True) -> Database:
        url = self.pg.new_database("bench") if migrated else self.pg.empty_database("bench")
        db = Database(url)
        db.install_probes(migrated)
        return db


@dataclass
class Database:
    url: str  # what agents and the stand-in use (the server's superuser)

    @property
    def bench_url(self) -> str:
        """The bench's own connections, under a role that the statement count leaves out."""
        info = psycopg.conninfo.conninfo_to_dict(self.url)
        info["user"] = BENCH_ROLE
        return psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in info.items()})

    def connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        return psycopg.connect(self.bench_url, autocommit=True)

    def install_probes(self, migrated: bool = True) -> None:
        with self.connect() as conn:
            conn.execute("create extension if not exists pg_stat_statements")
            if migrated:
                conn.execute(PROBES_SQL)

    def insert_run(
        self,
        conn: psycopg.Connection[Any],
        configuration: dict[str, Any],
        data_yaml: str = "fake.yaml",
        base_model: str | None = None,
    ) -> tuple[str, float]:
        """Insert a queued run (autocommit) and return its id and the monotonic time of the commit."""
        row = conn.execute(
            "insert into training_runs (data_yaml, base_model, configuration)"
            " values (%s, %s, %s) returning id",
            (data_yaml, base_model, json.dumps(configuration)),
        ).fetchone()
        committed = time.monotonic()
        assert row is not None
        return str(row[0]), committed

    def scalar(self, query: str, params: Sequence[Any] = ()) -> Any:
        with self.connect() as conn:
            row = conn.execute(query, params).fetchone()  # type: ignore[arg-type]
        return None if row is None else row[0]


PROBES_SQL = f"""
create table if not exists bench_claim_log (
    run_id uuid, worker_id text, attempt int, at timestamptz default clock_timestamp()
);
create table if not exists bench_insert_log (
    run_id uuid primary key, at timestamptz default clock_timestamp()
);

-- Security definer: the writers are API roles on the stand-in, which have no grant on the logs.
create or replace function bench_on_insert() returns trigger language plpgsql security definer as $$
begin
    insert into bench_insert_log (run_id) values (new.id);
    return null;
end $$;
drop trigger if exists bench_on_insert on training_runs;
create trigger bench_on_insert after insert on training_runs
    for each row execute function bench_on_insert();

create or replace function bench_on_update() returns trigger language plpgsql security definer as $$
begin
    if old.worker_id is null and new.worker_id is not null then
        insert into bench_claim_log (run_id, worker_id, attempt) values (new.id, new.worker_id, new.attempt);
    end if;
    if old.status is distinct from new.status then
        perform pg_notify('{STATUS_CHANNEL}', json_build_object(
            'id', new.id, 'status', new.status, 'worker_id', new.worker_id)::text);
    end if;
    return null;
end $$;
drop trigger if exists bench_on_update on training_runs;
create trigger bench_on_update after update on training_runs
    for each row execute function bench_on_update();
"""


class StatusWatch:
    """Status changes of `training_runs` as this process sees them commit (see module doc)."""

    def __init__(self, bench: Bench, db: Database) -> None:
        self._conn = psycopg.connect(db.bench_url, autocommit=True)
        self._conn.execute(sql.SQL("listen {}").format(sql.Identifier(STATUS_CHANNEL)))
        self._seen: dict[tuple[str, str], tuple[float, str | None]] = {}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="status-watch", daemon=True)
        self._thread.start()
        bench.callback(self.close)

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                for n in self._conn.notifies(timeout=0.2):
                    at = time.monotonic()
                    data = json.loads(n.payload)
                    with self._cond:
                        self._seen.setdefault((data["id"], data["status"]), (at, data.get("worker_id")))
                        self._cond.notify_all()
            except psycopg.Error:
                if self._stop.is_set():
                    return
                raise

    def wait(self, run_id: str, status: str, timeout: float) -> tuple[float, str | None]:
        """(monotonic time the status was seen committed, worker_id); TimeoutError after `timeout`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (run_id, status) not in self._seen:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"run {run_id} not {status!r} within {timeout:.0f}s")
                self._cond.wait(left)
            return self._seen[(run_id, status)]

    def seen(self, run_id: str, status: str) -> tuple[float, str | None] | None:
        with self._cond:
            return self._seen.get((run_id, status))

    def count(self, status: str) -> int:
        with self._cond:
            return sum(1 for (_, s) in self._seen if s == status)

    def wait_count(self, status: str, n: int, timeout: float) -> float:
        """Monotonic time at which `n` runs had been seen in `status`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                times = sorted(at for (_, s), (at, _w) in self._seen.items() if s == status)
                if len(times) >= n:
                    return times[n - 1]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(times)}/{n} runs {status!r} within {timeout:.0f}s")
                self._cond.wait(left)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        with contextlib.suppress(Exception):
            self._conn.close()


class Statements:
    """Statements executed by everyone but the bench role, from pg_stat_statements."""

    _TOTAL = """
        select coalesce(sum(s.calls), 0)::bigint
        from pg_stat_statements s join pg_roles r on r.oid = s.userid
        where s.dbid = (select oid from pg_database where datname = current_database())
          and r.rolname <> %s
    """
    _TOP = """
        select sum(s.calls)::bigint as calls, left(regexp_replace(s.query, '\\s+', ' ', 'g'), 90) as q
        from pg_stat_statements s join pg_roles r on r.oid = s.userid
        where s.dbid = (select oid from pg_database where datname = current_database())
          and r.rolname <> %s
        group by 2 order by 1 desc limit %s
    """

    def __init__(self, db: Database) -> None:
        self.db = db

    def reset(self) -> None:
        with self.db.connect() as conn:
            conn.execute("select pg_stat_statements_reset()")

    def total(self) -> int:
        return int(self.db.scalar(self._TOTAL, (BENCH_ROLE,)))

    def on_app_tables(self) -> int:
        """Statements on training_runs or trainer_workers: with the Supabase stand-in, one per REST
        request (what PostgREST runs for it), without the stand-in's own transaction wrapping."""
        return self.calls_matching(r"(training_runs|trainer_workers)")

    def calls_matching(self, pattern: str) -> int:
        """Calls of the statements whose text matches the regular expression `pattern`."""
        query = self._TOTAL + " and s.query ~ %s"
        return int(self.db.scalar(query, (BENCH_ROLE, pattern)))

    def top(self, n: int = 8) -> list[tuple[int, str]]:
        with self.db.connect() as conn:
            return [(int(c), str(q)) for c, q in conn.execute(self._TOP, (BENCH_ROLE, n)).fetchall()]


# Agents ---------------------------------------------------------------------------------------


def agent_env(
    data_dir: Path,
    worker_id: str,
    *,
    database_url: str | None = None,
    supabase: dict[str, str] | None = None,
    **overrides: str,
) -> dict[str, str]:
    """The environment of `python -m agent run` as an operator would set it, for one backend."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SUPABASE_", "DATABASE_URL"))}
    env.update(
        DATA_DIR=str(data_dir),
        WORKER_ID=worker_id,
        OFFLINE="1",
        LOG_JSON="1",
        LOG_LEVEL="INFO",
        PYTHONPATH=str(REPO),
        YOLO_OFFLINE="1",
        YOLO_AUTOINSTALL="0",
        # The benchmarks measure the agent around a fake trainer, off by default outside the embedded backend.
        ALLOW_FAKE_TRAINER="1",
        # A bench that stops early must not wait for a run in flight: stop and requeue it.
        SHUTDOWN_MODE="release",
    )
    if supabase is not None:
        env.update(SUPABASE_URL=supabase["url"], SUPABASE_SERVICE_ROLE_KEY=supabase["service_role_key"])
    elif database_url is not None:
        env["DATABASE_URL"] = database_url
    env.update(overrides)
    return env


@dataclass
class AgentProcess:
    """`python -m agent run` in its own session, JSON log lines to a file, parsed incrementally."""

    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] = field(init=False)
    started_wall: float = field(init=False)
    started_mono: float = field(init=False)
    _records: list[dict[str, Any]] = field(init=False, default_factory=list)
    _offset: int = field(init=False, default=0)
    _partial: bytes = field(init=False, default=b"")

    def start(self, bench: Bench) -> AgentProcess:
        self._log = self.log_path.open("wb")
        self.started_wall = time.time()
        self.started_mono = time.monotonic()
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "agent", "run"],
            cwd=REPO,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        bench.callback(self.stop)
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def records(self) -> list[dict[str, Any]]:
        """Every JSON log record so far: message, level, time (epoch seconds) and bound fields."""
        with self.log_path.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if isinstance(item, dict) and "record" in item:
                rec = item["record"]
                self._records.append(
                    {
                        "message": rec["message"],
                        "level": rec["level"]["name"],
                        "time": rec["time"]["timestamp"],
                        **rec["extra"],
                    }
                )
        return self._records

    def logged(self, message: str, **fields: Any) -> list[dict[str, Any]]:
        return [
            r
            for r in self.records()
            if r["message"] == message and all(r.get(k) == v for k, v in fields.items())
        ]

    def wait_logged(self, message: str, timeout: float = 30.0, **fields: Any) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            self._check_alive()
            hits = self.logged(message, **fields)
            return hits[0] if hits else None

        return wait_until(found, timeout, f"log {message!r} {fields} in {self.log_path}", interval=0.005)

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Seconds from process start to the first subscribed event stream (from the log's clock)."""
        rec = self.wait_logged(READY_MESSAGE, timeout=timeout)
        return float(rec["time"]) - self.started_wall

    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"agent exited with {self.proc.returncode}:\n{tail}")

    def stop(self) -> None:
        kill_group(self.proc, term_timeout=15)
        self._log.close()


def start_agents(
    bench: Bench, n: int, make_env: Callable[[int], dict[str, str]], timeout: float = 180.0
) -> list[AgentProcess]:
    """Start `n` agents at once and wait until each has subscribed."""
    agents = [AgentProcess(make_env(i), bench.tmp / f"agent-{i}.log").start(bench) for i in range(n)]
    deadline = time.monotonic() + timeout
    for a in agents:
        a.wait_ready(timeout=max(1.0, deadline - time.monotonic()))
    return agents


def stop_all(agents: Sequence[AgentProcess]) -> None:
    """SIGTERM every agent at once, then wait for (or kill) each."""
    for a in agents:
        if a.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                a.proc.send_signal(signal.SIGTERM)
    for a in agents:
        a.stop()


# Misc -----------------------------------------------------------------------------------------


def spaced(rng: random.Random, low: float, high: float) -> None:
    """Sleep a random time in [low, high): inserts never line up with any timer of the agent."""
    time.sleep(rng.uniform(low, high))


@contextlib.contextmanager
def timed(label: str) -> Iterator[dict[str, float]]:
    box: dict[str, float] = {}
    start = time.monotonic()
    try:
        yield box
    finally:
        box["s"] = time.monotonic() - start
        log(f"{label}: {box['s']:.1f}s")


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpus": os.cpu_count(), "cpu": model}
