"""The systemd units: they parse, use only directives systemd knows, and say what operators rely on."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.config import Settings
from tests.deploy.conftest import PROCESS_ENV, UNITS, setting_names, unit_sections, unit_value

# The directives these units may use, from systemd.unit(5), systemd.service(5), systemd.exec(5) and
# systemd.kill(5): a typo is caught here even where systemd-analyze is not installed.
KNOWN = {
    "Unit": {
        "Description", "Documentation", "After", "Before", "Wants", "Requires", "BindsTo", "PartOf",
        "Conflicts", "StartLimitIntervalSec", "StartLimitBurst", "ConditionPathExists",
    },
    "Service": {
        "Type", "User", "Group", "Environment", "EnvironmentFile", "ExecStart", "ExecStartPre",
        "ExecStop", "ExecReload", "KillSignal", "KillMode", "TimeoutStopSec", "TimeoutStartSec",
        "Restart", "RestartSec", "StateDirectory", "StateDirectoryMode", "CacheDirectory",
        "WorkingDirectory", "LimitNOFILE", "LimitMEMLOCK", "NoNewPrivileges", "ProtectSystem",
        "ProtectHome", "PrivateTmp", "SupplementaryGroups", "Nice", "OOMScoreAdjust",
    },
    "Install": {"WantedBy", "RequiredBy", "Alias", "DefaultInstance"},
}  # fmt: skip
AGENT = "/opt/saturnos-agent/.venv/bin/saturnos-agent"


def seconds(value: str) -> float:
    if value == "infinity":
        return float("inf")
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*(min|ms|s|h)?", value):
        total += float(number) * {"": 1, "s": 1, "ms": 0.001, "min": 60, "h": 3600}[unit]
    return total


def graceful_shutdown_s() -> float:
    """What a release shutdown takes at most before its final writes: the trainers' two graces."""
    defaults = Settings()
    return defaults.stop_grace + defaults.kill_grace


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_units_parse_and_use_known_directives(path: Path) -> None:
    sections = unit_sections(path)
    assert set(sections) == {"Unit", "Service", "Install"}
    for section, pairs in sections.items():
        unknown = sorted({k for k, _ in pairs} - KNOWN[section])
        assert unknown == [], f"{path.name} [{section}]: {unknown}"


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_units_restart_stop_gracefully_and_read_an_environment_file(path: Path) -> None:
    sections = unit_sections(path)
    service = dict(sections["Service"])
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM" and service["KillMode"] == "mixed"
    assert service["User"] and service["User"] != "root"
    # A margin of a minute over the trainers' graces leaves time for the rows' final writes.
    assert seconds(service["TimeoutStopSec"]) >= graceful_shutdown_s() + 60
    assert "/etc/saturnos-agent/agent.env" in unit_value(sections, "Service", "EnvironmentFile")
    [start] = unit_value(sections, "Service", "ExecStart")
    assert start.split()[-2:] == [AGENT, "run"]
    names = [e.split("=", 1)[0] for e in unit_value(sections, "Service", "Environment")]
    names += re.findall(r"\b([A-Z][A-Z0-9_]*)=", start)
    assert names and set(names) <= setting_names() | PROCESS_ENV, names


def test_template_gives_each_gpu_its_own_agent() -> None:
    sections = unit_sections(UNITS[1])
    [start] = unit_value(sections, "Service", "ExecStart")
    # On the command line, where no environment file can override them.
    for setting in (
        "WORKER_ID=%H-%i",
        "DEVICES=%i",
        "MAX_CONCURRENT_RUNS=1",
        "DATA_DIR=/var/lib/saturnos-agent/%i",
    ):
        assert setting in start.split(), setting
    assert "saturnos-agent/%i" in unit_value(sections, "Service", "StateDirectory")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize(
    ("path", "unit"), [(UNITS[0], UNITS[0].name), (UNITS[1], "saturnos-agent@0.service")]
)
def test_systemd_analyze_verify(path: Path, unit: str, tmp_path: Path) -> None:
    # verify also checks that ExecStart's program exists: stand one in for the installed agent.
    agent = tmp_path / "saturnos-agent"
    agent.write_text("#!/bin/sh\n")
    agent.chmod(0o755)
    (tmp_path / path.name).write_text(path.read_text().replace(AGENT, str(agent)))
    out = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / unit)], capture_output=True, text=True, timeout=60
    )
    ours = [line for line in (out.stdout + out.stderr).splitlines() if path.name in line or unit in line]
    assert out.returncode == 0 and ours == [], out.stdout + out.stderr
