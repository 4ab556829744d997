"""`python -m tests.standin --database-url URL [--port N] [--storage-dir DIR]`: serve until interrupted."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import tempfile
from pathlib import Path

from tests.standin.auth import DEFAULT_JWT_SECRET
from tests.standin.fixtures import start_project
from tests.standin.server import StandIn


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.standin", description=__doc__)
    parser.add_argument("--database-url", required=True, help="Postgres the project's data lives in")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--storage-dir", type=Path, help="folder for Storage (default: a new temporary one)")
    parser.add_argument("--jwt-secret", default=DEFAULT_JWT_SECRET)
    parser.add_argument(
        "--publish", action="append", default=[], metavar="TABLE", help="add a table to supabase_realtime"
    )
    parser.add_argument(
        "--bare",
        action="store_true",
        help="do not apply the saturnos-agent migration (a project with nothing granted or published)",
    )
    parser.add_argument(
        "--max-events-per-second",
        type=float,
        default=None,
        help="Realtime's event quota (100 Free, 500 Pro, 2500 Team; default: count without a limit)",
    )
    parser.add_argument("--private-only", action="store_true", help="refuse joins of public channels")
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    storage_dir = args.storage_dir or Path(tempfile.mkdtemp(prefix="standin-storage-"))
    options = {
        "jwt_secret": args.jwt_secret,
        "host": args.host,
        "port": args.port,
        "max_events_per_second": args.max_events_per_second,
        "private_only": args.private_only,
    }
    if args.bare:
        server = StandIn(args.database_url, storage_dir, **options)
        await server.start()
    else:
        server = await start_project(args.database_url, storage_dir, **options)
    if args.publish:
        await server.publish(*args.publish)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    ready = {"url": server.url, "anon_key": server.anon_key, "service_role_key": server.service_role_key}
    sys.stdout.write(json.dumps(ready) + "\n")
    sys.stdout.flush()
    try:
        await stop.wait()
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(_serve(_parse(argv)))


if __name__ == "__main__":
    main()
