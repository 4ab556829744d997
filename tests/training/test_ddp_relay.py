"""Multi-GPU plumbing that runs without GPUs: the callbacks survive the pickling into DDP ranks,
and rank 0's messages reach the parent's pipe through the child's relay."""

from __future__ import annotations

import os
from pathlib import Path

import cloudpickle
import pytest

from agent.domain.messages import Done, EpochEnd, Started, decode
from agent.training.control import Control
from agent.training.yolo import DDP_MESSAGES, _RankZeroRelay, _Reporter


def test_rank_zero_messages_are_relayed_and_other_ranks_are_silent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    read_fd, write_fd = os.pipe()
    control = Control(write_fd)
    relay = _RankZeroRelay(tmp_path / DDP_MESSAGES, control)
    reporter = _Reporter(relay.sink, device_note="multi-GPU", report_end=True)
    # What ultralytics does to callbacks before it starts the ranks.
    callbacks = cloudpickle.loads(cloudpickle.dumps(reporter.callbacks()))
    assert "on_train_end" in callbacks
    rank_sink = cloudpickle.loads(cloudpickle.dumps(relay.sink))

    relay.start()
    monkeypatch.setenv("RANK", "1")
    rank_sink.send(Started(total_epochs=9))
    monkeypatch.setenv("RANK", "0")
    rank_sink.send(Started(total_epochs=3))
    rank_sink.send(EpochEnd(epoch=1, total_epochs=3, metrics={"m": 0.5}))
    rank_sink.send(Done(save_dir="/x", metrics={}))
    relay.close()
    os.close(write_fd)

    with os.fdopen(read_fd, "rb") as pipe:
        received = [decode(line) for line in pipe.read().splitlines() if line.strip()]
    assert [type(m).__name__ for m in received] == ["Started", "EpochEnd", "Done"]
    assert isinstance(received[0], Started) and received[0].total_epochs == 3
    assert relay.done and control.last_epoch == 1
