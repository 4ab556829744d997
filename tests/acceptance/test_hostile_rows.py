"""The hostile corpus through one real agent per backend: each row fails cleanly, the agent goes on.

For every row: the final status, a message under the cap with no Python frames and no secret,
one claim only (no rescue loop), the agent alive throughout, and valid runs queued behind the
corpus still complete.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.datasets.synthetic import make_dataset
from tests.acceptance import hostile
from tests.acceptance.agentproc import AgentProc, base_env
from tests.acceptance.test_secrets import PASSWORD, with_password
from tests.acceptance.test_supabase_agent import Project, agent_env, project  # noqa: F401
from tests.util import wait_for_sync

# Messages that would mean a row got further than its own run.
BUGS = ("run pipeline crashed", "hint handling failed; going on", "claimed row unreadable, skipped: {}")


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "datasets" / "shapes", "detect", train=4, val=2, imgsz=64)


def operator_folders(tmp_path: Path, dataset: Path) -> dict[str, str]:
    weights = tmp_path / "weights"
    weights.mkdir(exist_ok=True)
    # A model file the agent can reach, but not in WEIGHTS_DIR: a row naming it must be refused.
    (tmp_path / "agent").mkdir(exist_ok=True)
    (tmp_path / "agent" / "outside.pt").write_bytes(b"not the operator's")
    return {
        "WEIGHTS_DIR": str(weights),
        "DATASET_ROOT": str(dataset.parent.parent),
        "MAX_CONCURRENT_RUNS": "4",
    }


def run_corpus(agent: AgentProc, database_url: str, dataset: Path, secrets: tuple[str, ...]) -> None:
    cases = hostile.corpus(dataset)
    assert len(cases) >= 25
    ids = {hostile.insert(database_url, case): case for case in cases}
    valid = [hostile.insert_valid(database_url) for _ in range(3)]

    final = wait_for_sync(
        lambda: hostile.finished(database_url, [*ids, *valid]),
        timeout=180,
        interval=0.2,
        what="every corpus row finished",
    )
    assert agent.proc.poll() is None, "the agent stopped"
    for run_id, case in ids.items():
        row = final[run_id]
        assert row["status"] == "failed", (case.name, row)
        assert row["attempt"] == 1, (case.name, "claimed more than once")
        hostile.check_message(case, row["error_message"], secrets)
    for run_id in valid:
        assert final[run_id]["status"] == "completed", final[run_id]
    bugs = [r for r in agent.records() if r.get("message") in BUGS]
    assert bugs == []
    log = agent.log_path.read_text(errors="replace")
    for secret in secrets:
        assert secret not in log


@pytest.fixture
def agents() -> Iterator[list[AgentProc]]:
    started: list[AgentProc] = []
    yield started
    for a in started:
        a.kill()


def test_hostile_rows_on_postgres(
    database_url: str, tmp_path: Path, dataset: Path, agents: list[AgentProc]
) -> None:
    folders = operator_folders(tmp_path, dataset)
    env = base_env(with_password(database_url), tmp_path / "agent", WORKER_ID="corpus", **folders)
    agent = AgentProc(env, tmp_path / "agent.log").start()
    agents.append(agent)
    agent.wait_ready(60)
    run_corpus(agent, database_url, dataset, (PASSWORD,))


def test_hostile_rows_on_the_supabase_stand_in(
    project: Project,  # noqa: F811
    database_url: str,
    tmp_path: Path,
    dataset: Path,
    agents: list[AgentProc],
) -> None:
    env = agent_env(
        project,
        tmp_path / "agent",
        "corpus",
        ARTIFACT_URL_MODE="signed",
        # Realtime is a hint; the poll is the truth, and must carry the corpus through on its own.
        POLL_INTERVAL="2",
        HEARTBEAT_INTERVAL="1",
        STALE_AFTER="10",
        **operator_folders(tmp_path, dataset),
    )
    agent = AgentProc(env, tmp_path / "agent.log").start()
    agents.append(agent)
    agent.wait_ready(60)
    run_corpus(agent, database_url, dataset, (project.service_role_key,))
