"""The local Supabase stand-in (tests/standin) for the supabase variants of the benchmarks."""

from __future__ import annotations

import json
import select
import subprocess
import threading
import time
from pathlib import Path
from typing import IO

from bench.common import PYTHON, REPO, Bench, Database, kill_group

SUPABASE_BACKEND = REPO / "agent" / "backends" / "supabase" / "__init__.py"
STANDIN_MAIN = REPO / "tests" / "standin" / "__main__.py"


def supabase_available() -> bool:
    return (
        STANDIN_MAIN.is_file()
        and SUPABASE_BACKEND.is_file()
        and "def open_supabase" in SUPABASE_BACKEND.read_text()
    )


def publish_training_runs(db: Database) -> None:
    """Put training_runs into `supabase_realtime`, as the migration does on a Supabase project."""
    with db.connect() as conn:
        conn.execute(
            """
            do $$
            begin
                if not exists (select 1 from pg_publication where pubname = 'supabase_realtime') then
                    create publication supabase_realtime;
                end if;
                if not exists (select 1 from pg_publication_tables where pubname = 'supabase_realtime'
                               and schemaname = 'public' and tablename = 'training_runs') then
                    alter publication supabase_realtime add table public.training_runs;
                end if;
            end $$;
            """
        )


def start_standin(
    bench: Bench,
    db: Database,
    storage_dir: Path | None = None,
    extra: tuple[str, ...] = (),
    command: tuple[str, ...] | None = None,
    timeout: float = 60.0,
) -> dict[str, str]:
    """`python -m tests.standin` as a subprocess; returns its {url, anon_key, service_role_key}."""
    if not supabase_available():
        raise SystemExit("the supabase backend or tests/standin/__main__.py is not there yet")
    publish_training_runs(db)
    storage = storage_dir or bench.tmp / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    log_path = bench.tmp / "standin.log"
    stderr = log_path.open("wb")
    bench.callback(stderr.close)
    proc = subprocess.Popen(
        [
            PYTHON,
            *(command or ("-m", "tests.standin")),
            "--database-url",
            db.url,
            "--storage-dir",
            str(storage),
            "--publish",
            "public.training_runs",
            *extra,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=stderr,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    bench.callback(kill_group, proc)
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buffered = b""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the stand-in exited: {log_path.read_text(errors='replace')[-2000:]}")
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            chunk = proc.stdout.read1(65536)  # type: ignore[attr-defined]
            buffered += chunk
            for line in buffered.splitlines():
                try:
                    info = json.loads(line)
                except ValueError:
                    continue
                if isinstance(info, dict) and "url" in info:
                    # Keep reading its stdout, or a chatty server would block on a full pipe.
                    threading.Thread(target=_drain, args=(proc.stdout,), daemon=True).start()
                    return {k: str(v) for k, v in info.items()}
    raise TimeoutError(f"the stand-in printed no JSON line within {timeout:.0f}s")


def _drain(stream: IO[bytes]) -> None:
    while stream.read1(65536):  # type: ignore[attr-defined]
        pass


def supabase_env(bench: Bench, db: Database) -> dict[str, str]:
    return start_standin(bench, db)
