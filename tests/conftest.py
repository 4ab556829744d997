from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.pg import TestPostgres

# The Supabase stand-in's `standin` fixture, and databases with the web app's schema.
pytest_plugins = ["tests.standin.fixtures", "tests.appschema.fixtures"]

# Ultralytics must never reach for the network in tests, in this process or in children.
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "0")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[TestPostgres]:
    server = TestPostgres.start()
    yield server
    server.stop()


@pytest.fixture
def database_url(pg_server: TestPostgres) -> str:
    """A fresh, migrated database for this test."""
    return pg_server.new_database()
