"""The job handed to the child: a TrainJob plus child options, as a JSON file in the workspace."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, cast

from agent.domain.request import FakeOptions, Task, TrainerKind, TrainingRequest
from agent.ports import PreparedDataset, TrainJob

JOB_FILE = "job.json"


@dataclass(frozen=True, slots=True)
class ChildJob:
    job: TrainJob
    offline: bool


def write_job(job: TrainJob, *, offline: bool) -> Path:
    """Write the job into its workspace and return the file's path."""
    path = job.workspace / JOB_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(job_to_dict(job, offline=offline), indent=1))
    tmp.replace(path)
    return path


def read_job(path: Path) -> ChildJob:
    """Read a job written by `write_job`."""
    data = json.loads(path.read_text())
    return ChildJob(job=job_from_dict(data), offline=bool(data.get("offline", False)))


def job_to_dict(job: TrainJob, *, offline: bool) -> dict[str, Any]:
    request = {f.name: getattr(job.request, f.name) for f in fields(job.request)}
    request["augmentation"] = dict(job.request.augmentation)
    request["fake"] = asdict(job.request.fake)
    request["notes"] = list(job.request.notes)
    dataset = None
    if job.dataset is not None:
        dataset = {
            "yaml_path": str(job.dataset.yaml_path),
            "task": job.dataset.task,
            "summary": dict(job.dataset.summary),
        }
    return {
        "run_id": job.run_id,
        "attempt": job.attempt,
        "request": request,
        "workspace": str(job.workspace),
        "dataset": dataset,
        "model": job.model,
        "resume_from": None if job.resume_from is None else str(job.resume_from),
        "offline": offline,
    }


def job_from_dict(data: dict[str, Any]) -> TrainJob:
    raw = dict(data["request"])
    request = TrainingRequest(
        **{
            **raw,
            "task": cast("Task | None", raw.get("task")),
            "trainer": cast(TrainerKind, raw.get("trainer", "ultralytics")),
            "augmentation": {str(k): float(v) for k, v in raw.get("augmentation", {}).items()},
            "fake": FakeOptions(**raw.get("fake", {})),
            "notes": tuple(raw.get("notes", ())),
        }
    )
    ds = data.get("dataset")
    dataset = None
    if ds is not None:
        dataset = PreparedDataset(
            yaml_path=Path(ds["yaml_path"]),
            task=cast(Task, ds["task"]),
            summary={str(k): int(v) for k, v in ds.get("summary", {}).items()},
        )
    resume = data.get("resume_from")
    return TrainJob(
        run_id=str(data["run_id"]),
        attempt=int(data["attempt"]),
        request=request,
        workspace=Path(data["workspace"]),
        dataset=dataset,
        model=str(data["model"]),
        resume_from=None if resume is None else Path(resume),
    )
