"""Every setting is documented where operators look: .env.example and the README."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from agent.config import Settings

REPO = Path(__file__).resolve().parents[2]


def test_every_setting_is_in_env_example_and_the_readme() -> None:
    env = (REPO / ".env.example").read_text()
    readme = (REPO / "README.md").read_text()
    names = [f.name.upper() for f in fields(Settings)]
    assert [n for n in names if f"\n{n}=" not in env] == []
    assert [n for n in names if f"`{n}`" not in readme] == []
    # Each setting in .env.example has its one comment line right above it.
    lines = env.splitlines()
    for i, line in enumerate(lines):
        if line and not line.startswith("#"):
            assert lines[i - 1].startswith("#"), line
