"""The Supabase stand-in with per-request latency, for bench/fetch.py (a subprocess of it).

    python bench/standin_server.py --database-url URL --storage-dir DIR [--storage-latency S] ...

As `python -m tests.standin`, plus the stand-in's own latency fault switched on at start for
the services named: every request of that service waits that long before it is handled, each
request on its own (concurrent requests wait concurrently, as over a network with that latency).
Prints one JSON line {url, anon_key, service_role_key} and serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.standin import StandIn


async def serve(args: argparse.Namespace) -> None:
    server = StandIn(args.database_url, args.storage_dir)
    await server.start()
    if args.publish:
        await server.publish(*args.publish)
    server.faults.latency("storage", args.storage_latency)
    server.faults.latency("rest", args.rest_latency)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    ready = {"url": server.url, "anon_key": server.anon_key, "service_role_key": server.service_role_key}
    print(json.dumps(ready), flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--database-url", required=True)
    p.add_argument("--storage-dir", type=Path, required=True)
    p.add_argument("--publish", action="append", default=[])
    p.add_argument("--storage-latency", type=float, default=0.0, help="seconds added to each request")
    p.add_argument("--rest-latency", type=float, default=0.0, help="seconds added to each request")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(serve(p.parse_args()))


if __name__ == "__main__":
    main()
