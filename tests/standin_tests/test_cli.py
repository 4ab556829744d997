"""`python -m tests.standin` on its own: prepares the database, prints its keys, stops on SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psycopg

from tests import pg

REPO = Path(__file__).resolve().parents[2]


def test_cli_serves_until_terminated(pg_server: pg.TestPostgres, tmp_path: Path) -> None:
    url = pg_server.empty_database()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.standin",
            "--bare",
            "--database-url",
            url,
            "--storage-dir",
            str(tmp_path),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        assert set(ready) == {"url", "anon_key", "service_role_key"}
        headers = {"apikey": ready["anon_key"]}
        response = httpx.get(f"{ready['url']}/rest/v1/nope", headers=headers, timeout=5)
        assert response.status_code == 404 and response.json()["code"] == "PGRST205"
        with psycopg.connect(url) as conn:
            publication = conn.execute(
                "select count(*) from pg_publication where pubname = 'supabase_realtime'"
            )
            assert publication.fetchone() == (1,)
            tables = conn.execute(
                "select count(*) from pg_publication_tables where pubname = 'supabase_realtime'"
            )
            assert tables.fetchone() == (0,)  # empty, as on a new project
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
