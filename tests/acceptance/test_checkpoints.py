"""A run handed to another agent resumes from its checkpoint only if an agent signed exactly those bytes."""

from __future__ import annotations

import signal
from pathlib import Path

from tests.acceptance.agentproc import AgentProc, base_env, insert_run, wait_status
from tests.util import wait_for_sync

SECRET = "fleet-secret-0123456789abcdef"
REFUSED = "checkpoint is not signed by an agent: ignored, training starts over"
LONG = {"trainer": "fake", "epochs": 40, "fakeEpochSeconds": 0.2}


def test_only_an_agent_signed_checkpoint_is_resumed(database_url: str, tmp_path: Path) -> None:
    artifacts = tmp_path / "artifacts"  # shared by both agents, as a bucket would be
    common = {
        "AGENT_SECRET": SECRET,
        "ARTIFACTS_DIR": str(artifacts),
        "CHECKPOINT_INTERVAL": "0.1",
        "SHUTDOWN_MODE": "release",
        "MAX_CONCURRENT_RUNS": "2",
    }
    first = AgentProc(base_env(database_url, tmp_path / "a1", WORKER_ID="a1", **common), tmp_path / "a1.log")
    second = AgentProc(base_env(database_url, tmp_path / "a2", WORKER_ID="a2", **common), tmp_path / "a2.log")
    try:
        first.start().wait_ready(60)
        honest, forged = insert_run(database_url, LONG), insert_run(database_url, LONG)

        def uploaded() -> bool:
            runs = {r.get("run_id") for r in first.logged("checkpoint uploaded")}
            return {honest, forged} <= runs

        wait_for_sync(uploaded, timeout=60, what="both checkpoints uploaded")
        first.signal(signal.SIGTERM)
        assert first.wait_exit(timeout=30) == 0
        for run_id in (honest, forged):
            assert wait_status(database_url, run_id, "queued")["attempt"] == 1
        # Someone with write access to the bucket replaces one checkpoint (its signature is kept).
        target = artifacts / "training_runs" / forged / "checkpoints" / "last.pt"
        target.write_bytes(b"not what an agent uploaded")

        second.start().wait_ready(60)
        for run_id in (honest, forged):
            assert wait_status(database_url, run_id, "running", "completed", timeout=30)["attempt"] == 2

        def decided() -> tuple[set[str], set[str]] | None:
            resumed = {r["run_id"] for r in second.logged("resuming from the previous attempt's checkpoint")}
            refused = {r["run_id"] for r in second.logged(REFUSED)}
            return (resumed, refused) if len(resumed | refused) >= 2 else None

        resumed, refused = wait_for_sync(decided, timeout=30, what="both runs resumed or refused")
        assert resumed == {honest} and refused == {forged}
    finally:
        first.kill()
        second.kill()
