"""`saturnos-agent doctor` against real parts: the test Postgres, roles with revoked grants, the stand-in."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest

from agent.config import Settings
from agent.doctor import Check, Limits, Report, diagnose
from tests.acceptance.agentproc import REPO, base_env
from tests.pg import TestPostgres
from tests.standin import StandIn

# Generous deadlines for a loaded 2-core machine; the disk thresholds are tested on their own.
LIMITS = Limits(connect_timeout=10, realtime_timeout=10, disk_error_gib=0, disk_warning_gib=0)
BUCKET = "training-artifacts"


def by_name(report: Report, name: str) -> list[Check]:
    return [c for c in report.checks if c.name == name]


def level(report: Report, name: str) -> str:
    """The worst level among the checks of that name."""
    levels = [c.level for c in by_name(report, name)]
    assert levels, f"no {name} check in {report.render()}"
    return "error" if "error" in levels else "warning" if "warning" in levels else "ok"


def errors(report: Report) -> list[Check]:
    return [c for c in report.checks if c.level == "error"]


def pg_settings(url: str, tmp_path: Path, **extra: object) -> Settings:
    return Settings(
        database_url=url, data_dir=tmp_path / "data", worker_id="doctor-test", offline=True, **extra
    )  # type: ignore[arg-type]


# Postgres ------------------------------------------------------------------------------------


async def test_postgres_is_ok_and_every_check_reports(database_url: str, tmp_path: Path) -> None:
    report = await diagnose(pg_settings(database_url, tmp_path), LIMITS)
    assert errors(report) == [], report.render()
    names = (
        "settings database schema grants rls publication events storage gpus training network weights disk"
    )
    for name in names.split():
        assert by_name(report, name), name
    assert "LISTEN/NOTIFY round trip" in by_name(report, "events")[0].detail
    assert "torch" in by_name(report, "training")[0].detail
    # Offline with no weights at hand: runs that ask for pretrained weights would fail.
    assert level(report, "weights") == "warning"


@pytest.fixture
def limited_role(pg_server: TestPostgres, database_url: str) -> Iterator[tuple[str, str]]:
    """A login role with the agent's grants on this database; the test revokes one."""
    role = f"agent_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"create role {role} login")
        conn.execute(f"grant usage on schema public to {role}")
        conn.execute(
            f"grant select, insert, update on public.training_runs, public.trainer_workers to {role}"
        )
    info = psycopg.conninfo.conninfo_to_dict(database_url)
    info["user"] = role
    yield role, psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in info.items()})
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"drop owned by {role}")
        conn.execute(f"drop role {role}")


async def test_a_revoked_grant_is_named(
    limited_role: tuple[str, str], database_url: str, tmp_path: Path
) -> None:
    role, url = limited_role
    granted = await diagnose(pg_settings(url, tmp_path), LIMITS)
    assert level(granted, "grants") == "ok", granted.render()
    assert role in by_name(granted, "database")[0].detail

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"revoke update on public.training_runs from {role}")
        conn.execute(f"grant update (cancel_requested) on public.training_runs to {role}")
    report = await diagnose(pg_settings(url, tmp_path), LIMITS)
    [grants] = by_name(report, "grants")
    assert grants.level == "error" and report.failed
    assert f"role {role} has no UPDATE on training_runs" in grants.detail
    assert "heartbeat_at" in grants.detail and "cancel_requested" not in grants.detail
    assert "GRANT UPDATE (status, worker_id" in grants.fix and f"TO {role}" in grants.fix


async def test_a_grant_only_submit_needs_is_a_warning(
    limited_role: tuple[str, str], database_url: str, tmp_path: Path
) -> None:
    role, url = limited_role
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"revoke insert on public.training_runs from {role}")
    report = await diagnose(pg_settings(url, tmp_path), LIMITS)
    [grants] = by_name(report, "grants")
    assert grants.level == "warning" and not report.failed, report.render()
    assert "no INSERT on training_runs" in grants.detail and "submit" in grants.detail


async def test_a_missing_realtime_publication_on_a_supabase_database(
    database_url: str, tmp_path: Path
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("create publication supabase_realtime")  # as a Supabase project has it: empty
    report = await diagnose(pg_settings(database_url, tmp_path), LIMITS)
    [publication] = by_name(report, "publication")
    assert publication.level == "error" and report.failed
    assert "training_runs is not in the supabase_realtime publication" in publication.detail
    assert "alter publication supabase_realtime add table public.training_runs" in publication.fix

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("alter publication supabase_realtime add table public.training_runs")
    assert level(await diagnose(pg_settings(database_url, tmp_path), LIMITS), "publication") == "warning"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("alter publication supabase_realtime add table public.trainer_workers")
    assert level(await diagnose(pg_settings(database_url, tmp_path), LIMITS), "publication") == "ok"


async def test_missing_notify_triggers_and_columns(database_url: str, tmp_path: Path) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("drop trigger saturnos_training_runs_notify_insert on public.training_runs")
        conn.execute("alter table public.training_runs drop column heartbeat_at")
    report = await diagnose(pg_settings(database_url, tmp_path), LIMITS)
    [events] = by_name(report, "events")
    assert events.level == "error" and "saturnos_training_runs_notify_insert" in events.detail
    [schema] = by_name(report, "schema")
    assert schema.level == "error" and "training_runs lacks heartbeat_at" in schema.detail
    assert "migrate" in schema.fix


async def test_an_unreachable_database_is_an_error_without_its_password(tmp_path: Path) -> None:
    url = "postgresql://agent:s3cret-pw@127.0.0.1:1/runs"
    report = await diagnose(
        pg_settings(url, tmp_path), Limits(connect_timeout=2, disk_error_gib=0, disk_warning_gib=0)
    )
    assert level(report, "database") == "error" and report.failed
    assert "s3cret-pw" not in report.render() and "s3cret-pw" not in report.as_json()
    assert "***" in by_name(report, "database")[0].detail


async def test_an_unwritable_artifacts_folder(database_url: str, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    report = await diagnose(pg_settings(database_url, tmp_path, artifacts_dir=blocker / "artifacts"), LIMITS)
    [storage] = by_name(report, "storage")
    assert storage.level == "error" and "ARTIFACTS_DIR" in storage.detail


async def test_weights_and_disk(database_url: str, tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "yolov8n.pt").write_bytes(b"x")
    report = await diagnose(
        pg_settings(database_url, tmp_path, weights_dir=weights),
        Limits(disk_error_gib=1e9, disk_warning_gib=1e9),
    )
    [found] = by_name(report, "weights")
    assert found.level == "warning" and "1 of 10" in found.detail and "yolov8n.pt" in found.detail
    assert "yolov8s-seg.pt" in found.detail  # named among those a run would miss
    assert level(report, "disk") == "error" and "GiB free" in by_name(report, "disk")[0].detail
    missing = await diagnose(pg_settings(database_url, tmp_path, weights_dir=tmp_path / "nope"), LIMITS)
    assert level(missing, "weights") == "error"


async def test_settings_errors(tmp_path: Path) -> None:
    anon = Settings(
        supabase_url="https://example.supabase.co",
        supabase_service_role_key=_jwt({"role": "anon"}),
        data_dir=tmp_path,
        offline=True,
    )
    report = await diagnose(anon, LIMITS)
    [settings] = by_name(report, "settings")
    assert settings.level == "error" and "'anon'" in settings.detail
    assert by_name(report, "database") == []  # nothing is tried with a key that cannot work
    pooler = pg_settings("postgresql://u:pw@aws-0-eu.pooler.supabase.com:6543/postgres", tmp_path)
    assert "transaction pooler" in by_name(await diagnose(pooler, LIMITS), "settings")[0].detail


def _jwt(claims: dict[str, str]) -> str:
    import base64

    def part(value: dict[str, str]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.c2ln"


# The stand-in ---------------------------------------------------------------------------------


def supa_settings(standin: StandIn, tmp_path: Path, **extra: object) -> Settings:
    return Settings(
        supabase_url=standin.url,
        supabase_service_role_key=standin.service_role_key,
        data_dir=tmp_path / "data",
        worker_id=f"doctor-{uuid.uuid4().hex[:6]}",
        offline=True,
        **extra,  # type: ignore[arg-type]
    )


@pytest.fixture
async def project(standin: StandIn) -> AsyncIterator[StandIn]:
    """A project as the migration leaves it: both tables published, the artifacts bucket public."""
    await standin.publish("public.trainer_workers")
    standin.storage.create_bucket(BUCKET, BUCKET, public=True)
    yield standin


async def test_standin_is_ok(project: StandIn, tmp_path: Path) -> None:
    settings = supa_settings(project, tmp_path)
    report = await diagnose(settings, LIMITS)
    assert errors(report) == [], report.render()
    assert "arrived through Realtime" in by_name(report, "events")[0].detail
    assert level(report, "publication") == "ok" and level(report, "grants") == "ok"
    assert "probe uploaded" in by_name(report, "storage")[0].detail
    assert project.storage.names(BUCKET) == []  # the probe object was deleted
    async with await psycopg.AsyncConnection.connect(project.database_url) as conn:
        cur = await conn.execute(
            "select status from trainer_workers where worker_id = %s", [settings.worker_id]
        )
        assert await cur.fetchone() == ("offline",)  # its own row, written as a stopped worker


async def test_standin_signed_mode_with_a_private_bucket(standin: StandIn, tmp_path: Path) -> None:
    await standin.publish("public.trainer_workers")
    standin.storage.create_bucket(BUCKET, BUCKET, public=False)
    signed = await diagnose(supa_settings(standin, tmp_path, artifact_url_mode="signed"), LIMITS)
    [artifacts] = [c for c in by_name(signed, "storage") if "training-artifacts" in c.detail]
    assert artifacts.level == "ok" and "read by its signed URL" in artifacts.detail, signed.render()
    public = await diagnose(supa_settings(standin, tmp_path), LIMITS)
    [storage] = [c for c in by_name(public, "storage") if c.level == "error"]
    assert "private" in storage.detail and "ARTIFACT_URL_MODE=signed" in storage.fix


async def test_standin_missing_bucket(standin: StandIn, tmp_path: Path) -> None:
    await standin.publish("public.trainer_workers")
    report = await diagnose(supa_settings(standin, tmp_path), LIMITS)
    [storage] = [c for c in by_name(report, "storage") if c.level == "error"]
    assert f"artifacts bucket '{BUCKET}' does not exist" in storage.detail and report.failed


async def test_standin_unwritable_bucket(standin: StandIn, tmp_path: Path) -> None:
    await standin.publish("public.trainer_workers")
    # A bucket that takes images only refuses the agent's weights, CSVs and checkpoints.
    standin.storage.create_bucket(BUCKET, BUCKET, public=True, allowed_mime_types=["image/png"])
    report = await diagnose(supa_settings(standin, tmp_path), LIMITS)
    [storage] = [c for c in by_name(report, "storage") if c.level == "error"]
    assert "cannot upload a probe object" in storage.detail and "mime" in storage.detail.lower()


async def test_standin_without_the_publication(database_url: str, tmp_path: Path) -> None:
    server = StandIn(database_url, tmp_path / "storage")
    await server.start()
    try:
        server.storage.create_bucket(BUCKET, BUCKET, public=True)
        report = await diagnose(supa_settings(server, tmp_path), LIMITS)
    finally:
        await server.stop()
    [publication] = by_name(report, "publication")
    assert publication.level == "error" and "training_runs" in publication.detail
    assert "Unable to subscribe" in publication.detail  # the server's own words
    [events] = by_name(report, "events")
    assert events.level == "warning" and "trainer_workers" in events.detail


async def test_standin_revoked_select_names_role_and_table(project: StandIn, tmp_path: Path) -> None:
    if not project.capabilities.role_switching:
        pytest.skip("the test database cannot act as the API roles")
    async with await psycopg.AsyncConnection.connect(project.database_url, autocommit=True) as conn:
        await conn.execute("revoke select on public.training_runs from service_role")
    report = await diagnose(supa_settings(project, tmp_path), LIMITS)
    grants = [c for c in by_name(report, "grants") if c.level == "error"]
    assert grants, report.render()
    assert "role service_role has no SELECT on training_runs" in grants[0].detail
    assert "migration" in grants[0].fix


# The command ----------------------------------------------------------------------------------


def doctor(database_url: str, tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", "doctor", *args],
        cwd=REPO,
        env=base_env(database_url, tmp_path / "cli", OFFLINE="1", **env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_command_prints_checks_and_exits_1_on_an_error(database_url: str, tmp_path: Path) -> None:
    ok = doctor(database_url, tmp_path, "--json")
    parsed = json.loads(ok.stdout)
    failed = [c for c in parsed["checks"] if c["level"] == "error"]
    # Only the disk may fail on a full CI disk; everything else must pass.
    assert [c["name"] for c in failed] in ([], ["disk"]), ok.stdout
    assert ok.returncode == (1 if failed else 0) and parsed["ok"] is not failed
    down = doctor(database_url, tmp_path, DATABASE_URL="postgresql://nobody:pw9x@127.0.0.1:1/none")
    assert down.returncode == 1
    assert "error    database" in down.stdout and "fix: " in down.stdout and "pw9x" not in down.stdout
    bad = doctor(database_url, tmp_path, "--json", POLL_INTERVAL="soon")
    assert bad.returncode == 1
    [setting] = json.loads(bad.stdout)["checks"]
    assert setting["name"] == "settings" and "POLL_INTERVAL" in setting["detail"]


# GPUs: no GPU here, so an executable named nvidia-smi on PATH answers as the real one does ---------


def fake_nvidia_smi(folder: Path, script: str) -> None:
    exe = folder / "nvidia-smi"
    exe.write_text(f"#!/bin/sh\n{script}\n")
    exe.chmod(0o755)


def test_gpus_are_listed_with_their_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.doctor import check_gpus

    fake_nvidia_smi(
        tmp_path,
        'echo "0, NVIDIA H200, 143771, 1024, 570.86.15"; echo "1, NVIDIA H200, 143771, 0, 570.86.15"',
    )
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    check = check_gpus()
    assert check.level == "ok"
    assert "0: NVIDIA H200, 1024/143771 MiB used (driver 570.86.15)" in check.detail
    assert "1: NVIDIA H200" in check.detail


def test_a_broken_driver_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.doctor import check_gpus

    fake_nvidia_smi(
        tmp_path,
        'echo "NVIDIA-SMI has failed because it couldn\'t communicate with the NVIDIA driver."; exit 9',
    )
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    check = check_gpus()
    assert check.level == "error" and "couldn't communicate with the NVIDIA driver" in check.detail
    assert "driver" in check.fix


async def test_row_level_security_without_a_policy_for_the_role(
    limited_role: tuple[str, str], database_url: str, tmp_path: Path
) -> None:
    role, url = limited_role
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("alter table public.training_runs enable row level security")
        conn.execute(
            "do $$ begin create role anon nologin; exception when duplicate_object then null; end $$"
        )
        conn.execute("create policy app_all on public.training_runs to anon using (true)")  # not the agent's
    report = await diagnose(pg_settings(url, tmp_path), LIMITS)
    [rls] = by_name(report, "rls")
    assert rls.level == "error" and "training_runs" in rls.detail and role in rls.detail
    assert "trainer_workers" not in rls.detail and f"ALTER ROLE {role} BYPASSRLS" in rls.fix

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            f"create policy agent_all on public.training_runs to {role} using (true) with check (true)"
        )
    assert level(await diagnose(pg_settings(url, tmp_path), LIMITS), "rls") == "ok"
