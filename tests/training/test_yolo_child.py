"""Real ultralytics training in the child, on synthetic data, on the CPU."""

from __future__ import annotations

import ast
import asyncio
import os
import time
from pathlib import Path

import pytest

from agent.datasets.synthetic import make_dataset
from agent.domain.messages import BatchProgress, Done, EpochEnd, Error, Started, Stopped, TrainerMessage
from agent.domain.request import Task
from agent.ports import PreparedDataset, TrainJob
from agent.training.child import AUDIT_SOCKETS_ENV, SLOW_BATCH_ENV
from agent.training.parent import ChildProcess, ChildTrainer
from tests.training import helpers

pytestmark = pytest.mark.slow

_DOWNLOADERS = ("pip", "curl", "wget", "git")


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, PreparedDataset]:
    root = tmp_path_factory.mktemp("synthetic")
    out: dict[str, PreparedDataset] = {}
    for task in ("detect", "segment"):
        path = make_dataset(root / task, task, train=16, val=4, imgsz=64)
        out[task] = PreparedDataset(yaml_path=path, task=task, summary={})
    path = make_dataset(root / "long", "detect", train=64, val=4, imgsz=64, seed=1)
    out["long"] = PreparedDataset(yaml_path=path, task="detect", summary={})
    return out


def trainer(audit: Path | None = None, slow_batch: float | None = None) -> ChildTrainer:
    env = dict(os.environ)
    if audit is not None:
        env[AUDIT_SOCKETS_ENV] = str(audit)
    if slow_batch is not None:
        env[SLOW_BATCH_ENV] = str(slow_batch)
    return ChildTrainer(stop_grace=3.0, kill_grace=3.0, offline=True, env=env)


def yolo_job(workspace: Path, dataset: PreparedDataset, **overrides: object) -> TrainJob:
    options: dict[str, object] = {
        "trainer": "ultralytics",
        "task": dataset.task,
        "epochs": 2,
        "batch": 8,
        "imgsz": 64,
        "device": "0",  # the web app's default; no CUDA here, so the child falls back to the CPU
        "pretrained": False,
        "plots": True,
        "seed": 0,
    }
    options.update(overrides)
    return helpers.job(workspace, dataset, **options)


async def collect(child: ChildProcess) -> list[TrainerMessage]:
    return [m async for m in child.messages()]


def network_attempts(audit: Path) -> list[str]:
    """Audit lines that are name lookups, internet connections, or downloader processes."""
    bad = []
    for line in audit.read_text().splitlines() if audit.exists() else []:
        _, event, detail = line.split(" ", 2)
        if event == "socket.connect":
            internet = isinstance(ast.literal_eval(detail), tuple)  # AF_INET/AF_INET6 addresses are tuples
        elif event == "subprocess.Popen":
            internet = any(tool in detail for tool in _DOWNLOADERS)
        else:
            internet = True  # name lookups
        if internet:
            bad.append(line)
    return bad


def assert_loads(weights: Path, task: Task) -> None:
    from ultralytics.models import YOLO

    model = YOLO(str(weights))
    assert model.task == task
    assert set(model.names.values()) == {"circle", "square", "triangle"}


@pytest.mark.parametrize("task", ["detect", "segment"])
async def test_two_epochs_offline(tmp_path: Path, datasets: dict[str, PreparedDataset], task: Task) -> None:
    audit = tmp_path / "audit.txt"
    job = yolo_job(tmp_path / "run", datasets[task])
    started = time.monotonic()
    child = await trainer(audit).start(job)

    messages = await collect(child)
    exit_ = await child.wait()
    elapsed = time.monotonic() - started
    print(f"{task}: 2 epochs in {elapsed:.1f}s")

    assert exit_.returncode == 0, exit_.tail
    assert isinstance(messages[0], Started)
    assert messages[0].device == "cpu" and "no CUDA" in messages[0].note
    assert any(isinstance(m, BatchProgress) for m in messages)
    ends = [m for m in messages if isinstance(m, EpochEnd)]
    assert [m.epoch for m in ends] == [1, 2]
    suffix = "(M)" if task == "segment" else "(B)"
    assert f"metrics/mAP50{suffix}" in ends[-1].metrics and "train/box_loss" in ends[-1].metrics
    assert ends[-1].checkpoint is not None and Path(ends[-1].checkpoint).is_file()
    done = messages[-1]
    assert isinstance(done, Done)
    save_dir = tmp_path / "run" / "train"
    assert done.save_dir == str(save_dir)
    assert f"metrics/mAP50-95{suffix}" in done.metrics
    for name in ("weights/best.pt", "weights/last.pt", "results.csv", "args.yaml", "results.png"):
        assert (save_dir / name).is_file(), name
    assert network_attempts(audit) == []
    assert helpers.live_group_members(child.pid) == []
    assert_loads(save_dir / "weights" / "best.pt", task)


async def test_stop_mid_epoch(tmp_path: Path, datasets: dict[str, PreparedDataset]) -> None:
    # 32 batches an epoch: the stop lands in the middle of the first one.
    job = yolo_job(tmp_path / "run", datasets["long"], epochs=3, batch=2, plots=False)
    child = await trainer().start(job)
    async for message in child.messages():
        if isinstance(message, BatchProgress):
            assert message.batch < message.batches
            break

    started = time.monotonic()
    exit_ = await child.stop("canceled by user")
    elapsed = time.monotonic() - started
    print(f"stop mid-epoch took {elapsed:.3f}s")

    assert elapsed < 2.0
    assert exit_.returncode == 0 and exit_.stopped
    assert isinstance((await collect(child))[-1], Stopped)
    assert helpers.live_group_members(child.pid) == []


async def test_a_stop_interrupts_a_slow_batch(tmp_path: Path, datasets: dict[str, PreparedDataset]) -> None:
    # Every batch does 3 s of tensor work: a stop at a batch end would take up to 3 s.
    job = yolo_job(tmp_path / "run", datasets["long"], epochs=3, batch=8, plots=False)
    child = await trainer(slow_batch=3.0).start(job)
    async for message in child.messages():
        if isinstance(message, BatchProgress):
            break
    # Not a wait for a state: the child reports no batch start, and this places the stop 0.5 s into
    # the next batch's 3 s of work, which is what the test measures.
    await asyncio.sleep(0.5)

    started = time.monotonic()
    exit_ = await child.stop("canceled by user")
    elapsed = time.monotonic() - started
    print(f"stop within a 3 s batch took {elapsed:.3f}s")

    assert elapsed < 1.5, "the stop waited for the end of the batch"
    assert exit_.returncode == 0 and exit_.stopped, exit_.tail
    assert isinstance((await collect(child))[-1], Stopped)
    assert helpers.live_group_members(child.pid) == []


async def test_resume_after_a_stop(tmp_path: Path, datasets: dict[str, PreparedDataset]) -> None:
    job = yolo_job(tmp_path / "first", datasets["detect"], epochs=3, plots=False)
    child = await trainer().start(job)
    checkpoint = None
    async for message in child.messages():
        if isinstance(message, EpochEnd):
            checkpoint = message.checkpoint
            break
    exit_ = await child.stop("host going down")
    assert exit_.stopped and checkpoint is not None

    # The next owner resumes in its own workspace from the completed epoch's checkpoint.
    resumed = yolo_job(
        tmp_path / "second", datasets["detect"], epochs=3, plots=False, resume_from=Path(checkpoint)
    )
    child = await trainer().start(resumed)
    messages = await collect(child)
    exit_ = await child.wait()

    assert exit_.returncode == 0, exit_.tail
    assert isinstance(messages[0], Started) and messages[0].start_epoch == 2
    assert [m.epoch for m in messages if isinstance(m, EpochEnd)] == [2, 3]
    assert isinstance(messages[-1], Done)
    assert (tmp_path / "second" / "train" / "weights" / "best.pt").is_file()

    # A finished training's checkpoint (optimizer stripped) cannot be resumed: the run starts over.
    finished = tmp_path / "second" / "train" / "weights" / "last.pt"
    again = yolo_job(tmp_path / "third", datasets["detect"], epochs=1, plots=False, resume_from=finished)
    child = await trainer().start(again)
    messages = await collect(child)
    assert (await child.wait()).returncode == 0
    assert isinstance(messages[0], Started) and messages[0].start_epoch == 1
    assert "cannot be resumed" in messages[0].note
    assert isinstance(messages[-1], Done)


async def test_a_training_error_is_reported(tmp_path: Path) -> None:
    missing = PreparedDataset(yaml_path=tmp_path / "absent" / "data.yaml", task="detect", summary={})
    child = await trainer().start(yolo_job(tmp_path / "run", missing))

    messages = await collect(child)
    exit_ = await child.wait()

    assert exit_.returncode == 1
    [error] = [m for m in messages if isinstance(m, Error)]
    assert "data.yaml" in error.message
    assert any("Traceback" in line or "Error" in line for line in exit_.tail)
