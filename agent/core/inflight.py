"""What an event about a run means while this agent is training it."""

from __future__ import annotations

from agent.core.pipeline import Interrupt
from agent.domain.run import Hint, Lease, RunRow


def interrupt_for(hint: Hint, lease: Lease) -> Interrupt | None:
    """`lost` when the row is no longer this lease's, `cancel` on a cancel request, else None.

    A run is lost when it was deleted, claimed by another worker (the old script claims without a
    condition), put back in the queue, or given a final or unknown status (the web app's project
    delete sets `canceled`; it also knows `stopped`). The agent then stops the child at once and
    writes nothing more to the row. An event from before this claim (a lower attempt) says nothing
    about it. The agent's own writes never look lost before its final write, which is the last.
    """
    if hint.op == "DELETE":
        return "lost"
    if hint.op == "POLL":
        # A poll hint carries no row image, only the cancel flag.
        return "cancel" if hint.cancel_requested else None
    if hint.op == "CHECK":
        # It only asks for a read of the row: see interrupt_for_row.
        return None
    if hint.attempt is not None and hint.attempt < lease.attempt:
        return None
    if hint.worker_id is not None and hint.worker_id != lease.worker_id:
        return "lost"
    if hint.unknown_status or (hint.status is not None and hint.status.terminal):
        return "lost"
    if hint.worker_id is None and hint.attempt is not None:
        # Same attempt, no owner: released or rescued back to the queue.
        return "lost"
    return "cancel" if hint.cancel_requested else None


def interrupt_for_row(row: RunRow | None, lease: Lease) -> Interrupt | None:
    """What a fresh read of a held run's row means; no row (deleted, or a status the store skips) is lost."""
    if row is None:
        return "lost"
    image = Hint(
        row.id,
        "UPDATE",
        claimable=False,
        cancel_requested=row.cancel_requested,
        worker_id=row.worker_id,
        status=row.status,
        raw_status=row.status.value,
        attempt=row.attempt,
    )
    return interrupt_for(image, lease)
