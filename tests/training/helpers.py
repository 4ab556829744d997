"""Builders and process checks shared by the training tests."""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil

from agent.domain.request import FakeOptions, TrainingRequest
from agent.ports import PreparedDataset, TrainJob


def request(**overrides: Any) -> TrainingRequest:
    base = TrainingRequest(
        data_yaml="data.yaml",
        base_model="YOLOv8n",
        task="detect",
        epochs=3,
        batch=8,
        imgsz=64,
        lr0=0.001,
        optimizer="Adam",
        device=None,
        pretrained=False,
        augmentation={},
        trainer="fake",
        fake=FakeOptions(epoch_seconds=0.2, batches=4),
    )
    return replace(base, **overrides)


def job(workspace: Path, dataset: PreparedDataset | None = None, **overrides: Any) -> TrainJob:
    model = "yolov8n-seg.yaml" if dataset is not None and dataset.task == "segment" else "yolov8n.yaml"
    resume = overrides.pop("resume_from", None)
    return TrainJob(
        run_id=workspace.name,
        attempt=1,
        request=request(**overrides),
        workspace=workspace,
        dataset=dataset,
        model=model,
        resume_from=resume,
    )


def live_group_members(pgid: int) -> list[int]:
    """Non-zombie processes of a group, by psutil (independent of the code under test)."""
    members = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return members


def process_alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def kill_quietly(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)
