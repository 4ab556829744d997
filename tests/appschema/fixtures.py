"""Databases with the web app's schema (tests/appschema/app_schema.sql) and the agent's on top."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import psycopg
import pytest

from agent.backends.postgres.migrate import migrate
from tests.pg import TestPostgres

APP_SCHEMA = Path(__file__).with_name("app_schema.sql")
APP_TEMPLATE = "saturnos_app_template"
SCHEMAS = ("agent-schema", "app-schema")


@pytest.fixture(scope="session")
def app_template(pg_server: TestPostgres) -> str:
    with psycopg.connect(pg_server.url("postgres"), autocommit=True) as conn:
        conn.execute(f"drop database if exists {APP_TEMPLATE}")
        conn.execute(f"create database {APP_TEMPLATE}")
    with psycopg.connect(pg_server.url(APP_TEMPLATE), autocommit=True) as conn:
        conn.execute(APP_SCHEMA.read_bytes())
    asyncio.run(migrate(pg_server.url(APP_TEMPLATE)))
    return APP_TEMPLATE


@pytest.fixture
def app_database_url(pg_server: TestPostgres, app_template: str) -> str:
    """A fresh database with the web app's schema, migrated by the agent."""
    name = f"app_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server.url("postgres"), autocommit=True) as conn:
        conn.execute(f"create database {name} template {app_template}")
    return pg_server.url(name)


@pytest.fixture(params=SCHEMAS)
def any_schema_database_url(request: pytest.FixtureRequest, pg_server: TestPostgres) -> str:
    """The agent's own schema, then the web app's: a test using it runs on both."""
    if request.param == "app-schema":
        return str(request.getfixturevalue("app_database_url"))
    return pg_server.new_database()
