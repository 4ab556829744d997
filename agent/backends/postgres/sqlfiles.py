"""Named SQL queries, loaded from the .sql files beside this module."""

from __future__ import annotations

from functools import cache
from importlib import resources


@cache
def query(name: str) -> str:
    return resources.files("agent.backends.postgres").joinpath("sql", f"{name}.sql").read_text()
