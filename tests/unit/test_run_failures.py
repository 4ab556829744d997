"""Run-level failures fail the run (never a rescue); models from the operator's bucket; fake trainer off."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from agent.backends.memory import MemoryBlobs
from agent.domain.errors import ModelNotFound
from agent.domain.request import Task, TrainingRequest
from agent.ports import PreparedDataset, TrainJob
from tests.unit.test_core import Harness, ScriptedProcess, ScriptedTrainer, _done, harness, run_config
from tests.util import wait_for


class BrokenDatasets:
    async def prepare(self, request: TrainingRequest, run_id: str, workspace: Path) -> PreparedDataset:
        raise RuntimeError("x" * 10_000 + '\nTraceback (most recent call last):\n  File "a.py", line 1')


def not_in_weights_dir(request: TrainingRequest, task: Task) -> str:
    raise ModelNotFound(f"Model file {request.base_model!r} not found in WEIGHTS_DIR.")


@dataclasses.dataclass
class ModelReadingTrainer(ScriptedTrainer):
    """Keeps the model file's bytes at start: the workspace is gone once the run ends."""

    models: list[bytes] = dataclasses.field(default_factory=list)

    async def start(self, job: TrainJob) -> ScriptedProcess:
        self.models.append(Path(job.model).read_bytes())
        return await super().start(job)


def with_deps(h: Harness, **changes: object) -> Harness:
    h.agent.deps = dataclasses.replace(h.agent.deps, **changes)  # type: ignore[arg-type]
    return h


async def test_an_unexpected_error_fails_the_run_once_with_a_short_message(tmp_path: Path) -> None:
    async with with_deps(harness(tmp_path), datasets=BrokenDatasets()) as h:
        run_id = h.store.insert_row(data_yaml="d.yaml", configuration=run_config())
        good = h.store.insert_row(data_yaml="d.yaml", configuration=run_config())
        await wait_for(lambda: _done(h, run_id) and _done(h, good), timeout=5)
    rec = h.store.runs[run_id]
    assert rec.status == "failed" and rec.attempt == 1
    message = rec.error_message or ""
    assert message.startswith("The run failed on an unexpected error: RuntimeError")
    assert len(message) < 400 and "Traceback" not in message
    assert h.store.runs[good].status == "failed"  # the agent went on to the next run


async def test_a_model_missing_from_weights_dir_comes_from_the_models_bucket(tmp_path: Path) -> None:
    models = MemoryBlobs()
    source = tmp_path / "mine.pt"
    source.write_bytes(b"operator weights")
    await models.upload("mine.pt", source, "application/octet-stream")
    trainer = ModelReadingTrainer()
    h = with_deps(
        harness(tmp_path / "runs"), models=models, resolve_model=not_in_weights_dir, trainer=trainer
    )
    async with h:
        found = h.store.insert_row(data_yaml="d.yaml", base_model="mine.pt", configuration=run_config(1))
        missing = h.store.insert_row(data_yaml="d.yaml", base_model="other.pt", configuration=run_config(1))
        await wait_for(lambda: _done(h, found) and _done(h, missing), timeout=5)
    assert h.store.runs[found].status == "completed"
    assert Path(trainer.started[0].job.model).is_relative_to(tmp_path / "runs")
    assert trainer.models == [b"operator weights"]
    assert "neither in WEIGHTS_DIR nor in the models bucket" in (h.store.runs[missing].error_message or "")


async def test_the_fake_trainer_is_refused_where_it_is_off(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        run_id = h.store.insert_row(data_yaml="d.yaml", configuration={"trainer": "fake", "epochs": 1})
        await wait_for(lambda: _done(h, run_id), timeout=5)
    assert "ALLOW_FAKE_TRAINER" in (h.store.runs[run_id].error_message or "")
    assert h.trainer.started == []
