"""Two rows that used to run code on the host: a downloaded YAML, then that YAML as the model.

Row 1's `data_yaml` is an HTTP URL, so the agent downloads the YAML into its dataset cache, at a
path anyone can predict. Row 2 names that file as `base_model`: ultralytics builds the model from
it and `eval`s its `activation` string. The model must never come from there.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from agent.datasets.synthetic import make_dataset
from tests.acceptance import hostile
from tests.acceptance.agentproc import AgentProc, base_env, insert_run, wait_status


def evil_model_yaml(marker: Path) -> str:
    act = f"__import__('pathlib').Path({str(marker)!r}).write_text('ran') and None or torch.nn.SiLU()"
    return (
        "nc: 1\n"
        f'activation: "{act}"\n'
        "backbone:\n  - [-1, 1, Conv, [16, 3, 2]]\n"
        "head:\n  - [[0], 1, Detect, [nc]]\n"
        "train: images/train\nval: images/val\nnames: {0: a}\n"
    )


@pytest.fixture
def web(tmp_path: Path) -> Iterator[str]:
    root = tmp_path / "web"
    (root / "evil").mkdir(parents=True)
    (root / "evil" / "data.yaml").write_text(evil_model_yaml(tmp_path / "pwned"))
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_downloaded_yaml_named_as_the_model_runs_no_code(
    database_url: str, tmp_path: Path, web: str
) -> None:
    dataset = make_dataset(tmp_path / "datasets" / "shapes", "detect", train=4, val=2, imgsz=64)
    data_dir = tmp_path / "agent"
    env = base_env(
        database_url,
        data_dir,
        WORKER_ID="victim",
        DATASET_ROOT=str(dataset.parent.parent),
        ALLOW_PRIVATE_DATASET_URLS="true",  # the attacker's server is on this host in the test
        OFFLINE="1",
    )
    agent = AgentProc(env, tmp_path / "agent.log").start()
    try:
        agent.wait_ready(60)
        first = insert_run(database_url, {"epochs": 1}, data_yaml=f"{web}/evil/data.yaml")
        wait_status(database_url, first, "failed", "completed", timeout=60)
        cached = sorted(data_dir.rglob("*.yaml"))
        # Whatever a row left in the cache, or (if nothing) a file standing for it there.
        planted = next((p for p in cached if "evil" in p.read_text(errors="replace")), None)
        if planted is None:
            planted = data_dir / "cache" / "datasets" / "planted" / "data.yaml"
            planted.parent.mkdir(parents=True, exist_ok=True)
            planted.write_text(evil_model_yaml(tmp_path / "pwned"))
        config = {
            "epochs": 1,
            "imgSize": 64,
            "batchSize": 2,
            "device": "cpu",
            "task": "detect",
            "plots": False,
        }
        by_path = insert_run(database_url, config, data_yaml=str(dataset), base_model=str(planted))
        by_name = insert_run(database_url, config, data_yaml=str(dataset), base_model=planted.name)
        relative = insert_run(
            database_url,
            config,
            data_yaml=str(dataset),
            base_model=f"../cache/{planted.parent.name}/{planted.name}",
        )
        final = [
            wait_status(database_url, run_id, "failed", "completed", timeout=180)
            for run_id in (by_path, by_name, relative)
        ]
        assert not (tmp_path / "pwned").exists(), "the row's YAML ran code in the trainer"
        for row in final:
            assert row["status"] == "failed", row
            case = hostile.Case("code execution", "", json.dumps(config))
            hostile.check_message(case, row["error_message"])
            assert "base_model" in row["error_message"] or "ALLOW_ROW_MODEL_YAML" in row["error_message"]
        assert agent.proc.poll() is None
    finally:
        agent.kill()
