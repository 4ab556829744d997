"""The supervisor with real child processes: the fake trainer and a misbehaving stub."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from agent.domain.messages import BatchProgress, Done, EpochEnd, Started, Stopped, TrainerMessage
from agent.domain.request import FakeOptions
from agent.training.fake import CRASH_EXIT_CODE, FAKE_WEIGHTS_MAGIC
from agent.training.parent import CHILD_LOG, ChildProcess, ChildTrainer
from tests.training import helpers
from tests.util import wait_for

STUB = "tests.training.stub_child"


def trainer(**kwargs: object) -> ChildTrainer:
    options: dict[str, object] = {"stop_grace": 2.0, "kill_grace": 2.0, "offline": True}
    options.update(kwargs)
    return ChildTrainer(**options)  # type: ignore[arg-type]


def stub_trainer(mode: str, pid_file: Path, **kwargs: object) -> ChildTrainer:
    env = dict(os.environ, STUB_CHILD_MODE=mode, STUB_CHILD_PIDS=str(pid_file))
    return trainer(module=STUB, env=env, **kwargs)


async def collect(child: ChildProcess) -> list[TrainerMessage]:
    return [m async for m in child.messages()]


async def first_message(child: ChildProcess) -> TrainerMessage:
    async for m in child.messages():
        return m
    raise AssertionError("the child closed its pipe without a message")


def pids(pid_file: Path) -> list[int]:
    return [int(x) for x in pid_file.read_text().split()] if pid_file.exists() else []


async def test_fake_run_reports_in_order_and_writes_artifacts(tmp_path: Path) -> None:
    job = helpers.job(tmp_path / "run", epochs=3, fake=FakeOptions(epoch_seconds=0.2, batches=4))
    child = await trainer().start(job)

    messages = await collect(child)
    exit_ = await child.wait()

    assert exit_.returncode == 0 and not exit_.stopped
    assert isinstance(messages[0], Started) and messages[0].total_epochs == 3
    assert isinstance(messages[-1], Done)
    epochs = [m.epoch for m in messages if isinstance(m, EpochEnd)]
    assert epochs == [1, 2, 3]
    positions = [(m.epoch, m.batch) for m in messages if isinstance(m, BatchProgress)]
    assert positions == sorted(positions) and positions
    # Every batch report comes before its epoch's end.
    order = [
        (m.epoch, 0 if isinstance(m, BatchProgress) else 1)
        for m in messages
        if isinstance(m, BatchProgress | EpochEnd)
    ]
    assert len(order) == len(messages) - 2
    assert order == sorted(order)
    last_epoch = [m for m in messages if isinstance(m, EpochEnd)][-1]
    assert {"metrics/mAP50(B)", "metrics/mAP50-95(B)", "metrics/precision(B)", "metrics/recall(B)"} <= set(
        last_epoch.metrics
    )
    assert last_epoch.checkpoint == str(job.workspace / "train" / "weights" / "last.pt")
    train = job.workspace / "train"
    for name in ("weights/best.pt", "weights/last.pt", "results.csv", "args.yaml"):
        assert (train / name).is_file(), name
    assert (train / "weights" / "best.pt").read_bytes().startswith(FAKE_WEIGHTS_MAGIC)
    assert len((train / "results.csv").read_text().splitlines()) == 1 + 3
    assert helpers.live_group_members(child.pid) == []


async def test_stop_lands_within_one_batch_and_leaves_nothing(tmp_path: Path) -> None:
    # Five-second batches: only an in-batch stop can return quickly.
    job = helpers.job(tmp_path / "run", epochs=5, fake=FakeOptions(epoch_seconds=20.0, batches=4))
    child = await trainer().start(job)
    assert isinstance(await first_message(child), Started)

    started = time.monotonic()
    exit_ = await child.stop("canceled by user")
    elapsed = time.monotonic() - started

    assert elapsed < 1.0
    assert exit_.returncode == 0 and exit_.stopped
    rest = await collect(child)
    assert isinstance(rest[-1], Stopped)
    assert helpers.live_group_members(child.pid) == []
    with pytest.raises(ProcessLookupError):
        os.kill(child.pid, 0)  # the leader itself is reaped, not even a zombie


async def test_crash_is_reported_with_the_log_tail(tmp_path: Path) -> None:
    crashing = FakeOptions(epoch_seconds=0.1, batches=2, crash_at_epoch=2)
    job = helpers.job(tmp_path / "run", epochs=3, fake=crashing)
    child = await trainer().start(job)

    messages = await collect(child)
    exit_ = await child.wait()

    assert exit_.returncode == CRASH_EXIT_CODE and not exit_.stopped
    assert not any(isinstance(m, Done) for m in messages)
    assert any("crashed at epoch 2" in line for line in exit_.tail)
    assert (job.workspace / CHILD_LOG).is_file()


async def test_tail_is_this_attempts_log_only(tmp_path: Path) -> None:
    workspace = tmp_path / "run"
    crashing = FakeOptions(epoch_seconds=0.05, batches=1, crash_at_epoch=1)
    first = await trainer().start(helpers.job(workspace, epochs=2, fake=crashing))
    assert (await first.wait()).returncode == CRASH_EXIT_CODE

    second = await trainer().start(helpers.job(workspace, epochs=1, fake=FakeOptions(0.05, 1)))
    exit_ = await second.wait()

    assert exit_.returncode == 0
    assert not any("crashed" in line for line in exit_.tail)
    assert "crashed at epoch 1" in (workspace / CHILD_LOG).read_text()


async def test_sigterm_makes_the_fake_report_stopped(tmp_path: Path) -> None:
    job = helpers.job(tmp_path / "run", epochs=5, fake=FakeOptions(epoch_seconds=20.0, batches=4))
    child = await trainer().start(job)
    assert isinstance(await first_message(child), Started)

    os.killpg(child.pid, signal.SIGTERM)
    exit_ = await asyncio.wait_for(child.wait(), timeout=5)

    assert exit_.returncode == 0
    assert isinstance((await collect(child))[-1], Stopped)


async def test_resume_from_a_fake_checkpoint(tmp_path: Path) -> None:
    first = await trainer().start(helpers.job(tmp_path / "a", epochs=2, fake=FakeOptions(0.05, 1)))
    assert (await first.wait()).returncode == 0
    checkpoint = tmp_path / "a" / "train" / "weights" / "last.pt"

    second = await trainer().start(
        helpers.job(tmp_path / "b", epochs=4, fake=FakeOptions(0.05, 1), resume_from=checkpoint)
    )
    messages = await collect(second)

    assert messages[0] == Started(total_epochs=4, start_epoch=3, device="cpu", note="fake trainer")
    assert [m.epoch for m in messages if isinstance(m, EpochEnd)] == [3, 4]


async def test_child_ignoring_stop_gets_sigterm(tmp_path: Path) -> None:
    child = await stub_trainer("ignore-stop", tmp_path / "pids", stop_grace=0.5, kill_grace=5.0).start(
        helpers.job(tmp_path / "run")
    )
    assert isinstance(await first_message(child), Started)

    started = time.monotonic()
    exit_ = await child.stop("test")
    elapsed = time.monotonic() - started

    assert exit_.returncode == -signal.SIGTERM and exit_.stopped
    assert 0.5 <= elapsed < 3.0
    assert helpers.live_group_members(child.pid) == []


async def test_child_ignoring_sigterm_gets_sigkill(tmp_path: Path) -> None:
    child = await stub_trainer("ignore-term", tmp_path / "pids", stop_grace=0.3, kill_grace=0.5).start(
        helpers.job(tmp_path / "run")
    )
    assert isinstance(await first_message(child), Started)

    started = time.monotonic()
    exit_ = await child.stop("test")
    elapsed = time.monotonic() - started

    assert exit_.returncode == -signal.SIGKILL and exit_.stopped
    assert 0.8 <= elapsed < 3.0
    assert helpers.live_group_members(child.pid) == []


async def test_helpers_left_by_an_exited_child_are_killed(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    child = await stub_trainer("fork-exit", pid_file).start(helpers.job(tmp_path / "run"))
    try:
        # The forked helper holds the message pipe: the stream still ends once the group is reaped.
        messages = await asyncio.wait_for(collect(child), timeout=10)
        exit_ = await child.wait()

        assert exit_.returncode == 0
        assert isinstance(messages[0], Started)
        [helper] = pids(pid_file)
        assert not helpers.process_alive(helper)
        assert helpers.live_group_members(child.pid) == []
    finally:
        for pid in pids(pid_file):
            helpers.kill_quietly(pid)


async def test_helpers_of_a_stopped_child_are_killed(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    child = await stub_trainer("fork-stop", pid_file).start(helpers.job(tmp_path / "run"))
    try:
        assert isinstance(await first_message(child), Started)
        [helper] = await wait_for(lambda: pids(pid_file), what="helper pid recorded")
        assert helpers.process_alive(helper)

        exit_ = await child.stop("test")

        assert exit_.returncode == 0 and exit_.stopped
        assert not helpers.process_alive(helper)
        assert helpers.live_group_members(child.pid) == []
    finally:
        for pid in pids(pid_file):
            helpers.kill_quietly(pid)


async def test_messages_end_even_if_an_escaped_process_holds_the_pipe(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    child = await stub_trainer("escape", pid_file).start(helpers.job(tmp_path / "run"))
    try:
        messages = await asyncio.wait_for(collect(child), timeout=10)
        exit_ = await child.wait()
        assert exit_.returncode == 0
        assert isinstance(messages[0], Started)
    finally:
        for pid in pids(pid_file):
            helpers.kill_quietly(pid)


async def test_malformed_lines_are_skipped(tmp_path: Path) -> None:
    child = await stub_trainer("garbage", tmp_path / "pids").start(helpers.job(tmp_path / "run"))

    messages = await collect(child)

    assert messages == [Started(total_epochs=2), Done(save_dir="/nowhere", metrics={"metrics/mAP50(B)": 0.5})]
    assert (await child.wait()).returncode == 0


async def test_stop_after_exit_returns_at_once(tmp_path: Path) -> None:
    child = await trainer().start(helpers.job(tmp_path / "run", epochs=1, fake=FakeOptions(0.05, 1)))
    await child.wait()

    exit_ = await asyncio.wait_for(child.stop("late"), timeout=1)

    assert exit_.returncode == 0 and exit_.stopped
    # Messages nobody read yet are still there after the exit.
    assert isinstance((await collect(child))[-1], Done)


async def test_two_stops_escalate_once(tmp_path: Path) -> None:
    job = helpers.job(tmp_path / "run", epochs=5, fake=FakeOptions(epoch_seconds=20.0, batches=4))
    child = await trainer().start(job)
    assert isinstance(await first_message(child), Started)

    first, second = await asyncio.gather(child.stop("one"), child.stop("two"))

    assert first == second
    assert first.stopped and first.returncode == 0


async def test_many_fake_children_start_fast(tmp_path: Path) -> None:
    # The backbone's tests push hundreds of fake runs through here.
    started = time.monotonic()
    children = [
        await trainer().start(helpers.job(tmp_path / f"run{i}", epochs=1, fake=FakeOptions(0.0, 1)))
        for i in range(8)
    ]
    exits = await asyncio.gather(*(c.wait() for c in children))
    elapsed = time.monotonic() - started

    assert all(e.returncode == 0 for e in exits)
    assert elapsed < 8.0


async def test_relative_workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    child = await trainer().start(helpers.job(Path("runs") / "rel", epochs=1, fake=FakeOptions(0.05, 1)))

    messages = await collect(child)

    assert (await child.wait()).returncode == 0
    done = messages[-1]
    assert isinstance(done, Done) and done.save_dir == str(tmp_path / "runs" / "rel" / "train")
