"""`saturnos-agent run` with only SUPABASE_URL and a service-role key, against the stand-in.

Everything crosses real sockets: the stand-in and the agent are separate OS processes, the test
talks to the stand-in through the official supabase client as the web app would.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from supabase import AsyncClient, acreate_client

from agent.datasets.synthetic import make_dataset
from tests.acceptance.agentproc import REPO, AgentProc, claims_per_run, install_claim_log
from tests.acceptance.test_lifecycle import pid_alive
from tests.util import wait_for

pytestmark = pytest.mark.slow


@dataclass
class Project:
    url: str
    service_role_key: str
    anon_key: str
    proc: subprocess.Popen[str]


@pytest.fixture
def project(database_url: str, tmp_path: Path) -> Iterator[Project]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.standin",
            "--database-url",
            database_url,
            "--storage-dir",
            str(tmp_path / "storage"),
            "--publish",
            "public.training_runs",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        yield Project(info["url"], info["service_role_key"], info["anon_key"], proc)
    finally:
        proc.terminate()
        proc.wait(timeout=15)


@pytest.fixture
async def app(project: Project) -> AsyncIterator[AsyncClient]:
    """The web app's view: the official async client."""
    client = await acreate_client(project.url, project.service_role_key)
    yield client


def agent_env(project: Project, data_dir: Path, worker_id: str, **extra: str) -> dict[str, str]:
    """The environment of `saturnos-agent run` on a GPU host that only knows the Supabase project."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SUPABASE_", "DATABASE_URL"))}
    env.update(
        SUPABASE_URL=project.url,
        SUPABASE_SERVICE_ROLE_KEY=project.service_role_key,
        DATA_DIR=str(data_dir),
        WORKER_ID=worker_id,
        OFFLINE="1",
        LOG_JSON="1",
        PYTHONPATH=str(REPO),
        ALLOW_FAKE_TRAINER="1",
    )
    env.update(extra)
    return env


@pytest.fixture
def agent(project: Project, tmp_path: Path) -> Iterator[AgentProc]:
    env = agent_env(
        project,
        tmp_path / "agent",
        "gpu-7",
        ARTIFACT_URL_MODE="signed",
        # Slow poll and heartbeats: a pickup or a cancel within a second can only come from Realtime.
        POLL_INTERVAL="600",
        HEARTBEAT_INTERVAL="30",
        STALE_AFTER="300",
    )
    proc = AgentProc(env, tmp_path / "agent.log").start()
    try:
        yield proc
    finally:
        proc.kill()


async def upload_dataset(app: AsyncClient, root: Path, bucket: str = "datasets") -> str:
    await app.storage.create_bucket(bucket)
    files = [p for p in sorted(root.rglob("*")) if p.is_file()]
    for path in files:
        body = path.read_bytes()
        if path.name == "data.yaml":
            # As uploaded by the app: relative to the YAML (a host's absolute path is refused).
            body = re.sub(rb"(?m)^path:.*$", b"path: .", body)
        await app.storage.from_(bucket).upload(path.relative_to(root.parent).as_posix(), body)
    return f"storage:{bucket}/{root.name}/data.yaml"


async def row(app: AsyncClient, run_id: str) -> dict[str, Any]:
    result = await app.table("training_runs").select("*").eq("id", run_id).execute()
    return dict(result.data[0])


async def wait_row(app: AsyncClient, run_id: str, *statuses: str, timeout: float) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        r = await row(app, run_id)
        return r if r["status"] in statuses else None

    return await wait_for(check, timeout=timeout, interval=0.01, what=f"{run_id} in {statuses}")


async def wait_agent_ready(agent: AgentProc) -> None:
    await asyncio.to_thread(agent.wait_ready, 60)


async def test_realtime_pickup_storage_dataset_training_and_signed_artifacts(
    app: AsyncClient, agent: AgentProc, tmp_path: Path
) -> None:
    data_yaml = await upload_dataset(
        app, make_dataset(tmp_path / "shapes", "detect", train=16, val=4, imgsz=64).parent
    )
    await wait_agent_ready(agent)
    config = {
        "epochs": 2,
        "imgSize": 64,
        "batchSize": 8,
        "pretrained": False,
        "device": "cpu",
        "plots": False,
    }

    inserted = (
        await app.table("training_runs")
        .insert({"data_yaml": data_yaml, "base_model": "YOLOv8n", "configuration": config})
        .execute()
    )
    submitted = time.monotonic()
    run_id = inserted.data[0]["id"]
    await wait_row(app, run_id, "running", "completed", "failed", timeout=5)
    picked_up = time.monotonic() - submitted
    final = await wait_row(app, run_id, "completed", "failed", timeout=240)

    assert final["status"] == "completed", final["error_message"]
    assert picked_up < 1.0, f"picked up after {picked_up:.3f}s"
    assert final["worker_id"] == "gpu-7" and final["attempt"] == 1
    run_dir = Path(final["results"]["run_dir"])
    async with httpx.AsyncClient() as http:
        for artifact in final["results"]["artifacts"]:
            assert artifact["path"].startswith(f"training_runs/{run_id}/")
            assert "token=" in artifact["url"], "signed mode must give signed URLs"
            got = await http.get(artifact["url"])
            assert got.status_code == 200, artifact
            assert got.content, artifact["name"]
            if artifact["name"] == "results.csv":
                assert got.content.lstrip().startswith(b"epoch"), got.content[:100]
    # The workspace the artifacts came from is removed once the row is final.
    await wait_for(lambda: not run_dir.exists(), timeout=30, what="workspace removed")
    assert final["trained_model_url"].split("?")[0].endswith(f"training_runs/{run_id}/weights/best.pt")


async def test_the_cancel_button_stops_a_real_training_within_about_a_second(
    app: AsyncClient, agent: AgentProc, tmp_path: Path
) -> None:
    data_yaml = await upload_dataset(
        app, make_dataset(tmp_path / "long", "detect", train=32, val=4, imgsz=64).parent
    )
    await wait_agent_ready(agent)
    config = {
        "epochs": 100,
        "imgSize": 64,
        "batchSize": 2,
        "pretrained": False,
        "device": "cpu",
        "plots": False,
        "task": "detect",
    }
    inserted = (
        await app.table("training_runs")
        .insert({"data_yaml": data_yaml, "base_model": "YOLOv8n", "configuration": config})
        .execute()
    )
    run_id = inserted.data[0]["id"]

    async def mid_epoch() -> bool:
        progress = ((await row(app, run_id))["results"] or {}).get("progress") or {}
        return progress.get("batch", 0) > 0

    await wait_for(mid_epoch, timeout=120, what="training mid-epoch")
    started = [r for r in agent.logged("trainer started") if r.get("run_id") == run_id]
    pid = int(started[0]["pid"])

    await app.table("training_runs").update({"cancel_requested": True}).eq("id", run_id).execute()
    pressed = time.monotonic()
    await wait_for(lambda: not pid_alive(pid), timeout=10, interval=0.01, what="trainer gone")
    stopped = time.monotonic() - pressed
    final = await wait_row(app, run_id, "canceled", timeout=10)
    row_done = time.monotonic() - pressed

    assert stopped < 1.5, f"trainer stopped {stopped:.3f}s after the cancel"
    assert row_done < 3.0, f"row canceled {row_done:.3f}s after the cancel"
    assert final["error_message"] == "Canceled by user." and final["canceled_at"] is not None


@pytest.fixture
def quiet_agent(project: Project, tmp_path: Path) -> Iterator[AgentProc]:
    """No write to a run for 30 s once it trains: only an event can stop it sooner."""
    env = agent_env(
        project,
        tmp_path / "quiet",
        "gpu-8",
        POLL_INTERVAL="600",
        HEARTBEAT_INTERVAL="30",
        PROGRESS_INTERVAL="30",
        STALE_AFTER="300",
    )
    proc = AgentProc(env, tmp_path / "quiet.log").start()
    try:
        yield proc
    finally:
        proc.kill()


async def quiet_run(app: AsyncClient, agent: AgentProc, name: str) -> tuple[str, int]:
    """A long fake run inserted as the app does, training, its start written: (run id, trainer pid).

    The quiet agent writes the trainer's start at once and then nothing for 30 s, so only an event
    can stop the run sooner.
    """
    await wait_agent_ready(agent)
    config = {"trainer": "fake", "epochs": 2, "fakeEpochSeconds": 120, "fakeBatches": 1200}
    inserted = (
        await app.table("training_runs")
        .insert({"run_name": name, "data_yaml": "fake.yaml", "configuration": config})
        .execute()
    )
    run_id = str(inserted.data[0]["id"])
    started = await wait_for(
        lambda: [r for r in agent.logged("trainer started") if r.get("run_id") == run_id],
        timeout=20,
        what="trainer started",
    )

    async def trainer_start_written() -> bool:
        return bool(((await row(app, run_id))["results"] or {}).get("progress"))

    await wait_for(trainer_start_written, timeout=20, what="trainer start written")
    return run_id, int(started[0]["pid"])


async def test_a_run_deleted_by_the_app_stops_its_trainer_on_the_realtime_event(
    app: AsyncClient, project: Project, quiet_agent: AgentProc
) -> None:
    agent = quiet_agent
    run_id, pid = await quiet_run(app, agent, "to be deleted")
    # TrainingConfiguration.jsx's delete button, with the browser's anon key (the agent's
    # service role has no DELETE): only the Realtime DELETE event can stop the trainer this soon.
    browser = await acreate_client(project.url, project.anon_key)
    await browser.table("training_runs").delete().eq("id", run_id).execute()
    deleted = time.monotonic()
    await wait_for(lambda: not pid_alive(pid), timeout=10, interval=0.01, what="trainer gone")
    assert time.monotonic() - deleted < 3.0
    await asyncio.to_thread(
        agent.wait_logged, "lease lost (run taken away or deleted): dropped without a final write"
    )


async def test_a_run_claimed_by_the_old_script_stops_its_trainer_on_the_realtime_event(
    app: AsyncClient, quiet_agent: AgentProc
) -> None:
    agent = quiet_agent
    run_id, pid = await quiet_run(app, agent, "taken over")
    # A mixed rollout: the old script claims with an unconditional update. Its new row names only
    # the other worker, so nothing filtered on this agent's worker id would hear it.
    await (
        app.table("training_runs")
        .update({"status": "running", "worker_id": "old-script", "started_at": "now()"})
        .eq("id", run_id)
        .execute()
    )
    taken = time.monotonic()
    await wait_for(lambda: not pid_alive(pid), timeout=10, interval=0.01, what="trainer gone")
    assert time.monotonic() - taken < 1.5
    await asyncio.to_thread(
        agent.wait_logged, "lease lost (run taken away or deleted): dropped without a final write"
    )
    final = await row(app, run_id)
    assert (final["status"], final["worker_id"], final["completed_at"]) == ("running", "old-script", None)


async def test_claim_race_eight_agents_two_hundred_runs_on_supabase(
    project: Project, database_url: str, tmp_path: Path, app: AsyncClient
) -> None:
    install_claim_log(database_url)
    procs = []
    for i in range(8):
        env = agent_env(project, tmp_path / f"a{i}", f"a{i}")
        procs.append(AgentProc(env, tmp_path / f"a{i}.log").start())
    try:
        for p in procs:
            await wait_agent_ready(p)
        quick = {"trainer": "fake", "epochs": 1, "fakeEpochSeconds": 0.0, "fakeBatches": 1}
        for _ in range(4):
            await (
                app.table("training_runs")
                .insert([{"data_yaml": "fake.yaml", "configuration": quick} for _ in range(50)])
                .execute()
            )

        async def all_completed() -> bool:
            done = (
                await app.table("training_runs")
                .select("id", count="exact")
                .eq("status", "completed")
                .execute()
            )
            return done.count == 200

        await wait_for(all_completed, timeout=300, interval=0.5, what="200 runs completed")
        import psycopg

        claims = claims_per_run(database_url)
        with psycopg.connect(database_url) as conn:
            winners = conn.execute("select count(distinct worker_id) from training_runs").fetchone()
        assert len(claims) == 200 and all(n == 1 for _, n in claims), "a run was claimed twice"
        assert winners is not None and winners[0] >= 2
    finally:
        for p in procs:
            p.kill()
