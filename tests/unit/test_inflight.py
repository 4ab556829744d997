"""What an event means for a run in flight: the decision behind `lost` and `cancel`."""

from __future__ import annotations

import pytest

from agent.core.inflight import interrupt_for, interrupt_for_row
from agent.core.pipeline import Interrupt
from agent.domain.run import Hint, HintOp, Lease, RunRow
from agent.domain.status import RunStatus

LEASE = Lease("r1", "me", 2)


def hint(
    op: HintOp = "UPDATE",
    status: str | None = "running",
    worker: str | None = "me",
    attempt: int | None = 2,
    cancel: bool = False,
) -> Hint:
    known = status if status in {s.value for s in RunStatus} else None
    return Hint(
        "r1",
        op,
        claimable=False,
        cancel_requested=cancel,
        worker_id=worker,
        status=RunStatus(known) if known else None,
        raw_status=status,
        attempt=attempt,
    )


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        # Our own writes: the claim, progress, and `canceling`.
        (hint(), None),
        (hint(status="canceling", cancel=True), "cancel"),
        (hint(cancel=True), "cancel"),
        # The app's cancel button on a running run writes `canceling` and the flag.
        (hint(status="canceling", cancel=True, attempt=None), "cancel"),
        # Another worker's unconditional claim (the old script), with or without a known attempt.
        (hint(worker="old-script"), "lost"),
        (hint(worker="old-script", attempt=None), "lost"),
        # Ended by someone else: the app's project delete, a person with SQL, the app's `stopped`.
        (hint(status="canceled", cancel=True), "lost"),
        (hint(status="failed"), "lost"),
        (hint(status="stopped"), "lost"),
        (hint(status="paused-by-admin", attempt=None), "lost"),
        # Deleted, or put back in the queue (rescued while this host was unresponsive).
        (hint(op="DELETE", status=None, worker=None, attempt=None), "lost"),
        (hint(status="queued", worker=None), "lost"),
        # Events from before this claim say nothing about it.
        (hint(op="INSERT", status="queued", worker=None, attempt=0), None),
        (hint(worker="w-before", attempt=1), None),
        (hint(status="canceled", worker="w-before", attempt=1, cancel=True), None),
        # No attempt known and no owner: could be an old event; the fenced writes decide.
        (hint(status="queued", worker=None, attempt=None), None),
        # Polls carry only the cancel flag.
        (hint(op="POLL", status=None, worker=None, attempt=None), None),
        (hint(op="POLL", status=None, worker=None, attempt=None, cancel=True), "cancel"),
        # A feed's CHECK only asks for a read of the row.
        (hint(op="CHECK", status=None, worker=None, attempt=None), None),
    ],
)
def test_what_an_event_means_for_a_run_in_flight(event: Hint, expected: Interrupt | None) -> None:
    assert interrupt_for(event, LEASE) == expected


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (RunRow("r1", RunStatus.RUNNING, worker_id="me", attempt=2), None),
        (RunRow("r1", RunStatus.RUNNING, worker_id="me", attempt=2, cancel_requested=True), "cancel"),
        (RunRow("r1", RunStatus.CANCELING, worker_id="me", attempt=2, cancel_requested=True), "cancel"),
        # Claimed by the old script between our claim and the start of the run's feed.
        (RunRow("r1", RunStatus.RUNNING, worker_id="old-script", attempt=2), "lost"),
        (RunRow("r1", RunStatus.CANCELED, worker_id="me", attempt=2, cancel_requested=True), "lost"),
        (RunRow("r1", RunStatus.QUEUED, worker_id=None, attempt=2), "lost"),
        # Deleted, or a status the store skips (the app's `stopped`).
        (None, "lost"),
    ],
)
def test_what_a_read_of_a_held_run_means(row: RunRow | None, expected: Interrupt | None) -> None:
    assert interrupt_for_row(row, LEASE) == expected
