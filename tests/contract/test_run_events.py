"""RunEvents contract: changes that matter to agents arrive as hints; progress writes do not."""

from __future__ import annotations

from agent.domain.run import Canceled, NewRun
from agent.domain.status import RunStatus
from tests.contract.conftest import Harness, listening
from tests.util import wait_for

NEW = NewRun("/data/a.yaml", "YOLOv8n", {"epochs": 1})


async def test_listen_subscribes_once_and_is_healthy(backend: Harness) -> None:
    events = backend.events()
    assert events.healthy is False
    async with listening(events) as listener:
        assert listener.subscriptions == 1
        assert events.healthy
    assert events.healthy is False


async def test_an_insert_is_a_claimable_hint(backend: Harness) -> None:
    async with listening(backend.events()) as listener:
        run_id = await backend.store.submit(NEW)
        hints = await wait_for(lambda: listener.for_run(run_id), what="insert hint")
    assert hints[0].op == "INSERT"
    assert hints[0].claimable is True
    assert hints[0].cancel_requested is False
    assert hints[0].worker_id is None
    assert hints[0].status is RunStatus.QUEUED


async def test_a_cancel_request_on_a_held_run_is_an_update_hint(backend: Harness) -> None:
    run_id = await backend.store.submit(NEW)
    async with listening(backend.events()) as listener:
        claim = await backend.store.claim(run_id, "w1")
        assert claim is not None
        await listener.hold(backend, run_id)
        assert await backend.store.request_cancel(run_id)
        hints = await wait_for(lambda: [h for h in listener.changes(run_id) if h.cancel_requested])
    cancel = hints[0]
    assert (cancel.op, cancel.cancel_requested, cancel.worker_id) == ("UPDATE", True, "w1")
    assert cancel.claimable is False and cancel.attempt == claim.lease.attempt


async def test_another_workers_claim_of_a_held_run_is_a_hint(backend: Harness) -> None:
    run_id = await backend.store.submit(NEW)
    claim = await backend.store.claim(run_id, "w1")
    assert claim is not None
    async with listening(backend.events()) as listener:
        await listener.hold(backend, run_id)
        # The old script's unconditional claim: the new row names only the other worker.
        await backend.set_fields(run_id, worker_id="old-script")
        hints = await wait_for(lambda: [h for h in listener.changes(run_id) if h.worker_id == "old-script"])
    assert (hints[0].op, hints[0].status) == ("UPDATE", RunStatus.RUNNING)


async def test_a_cancel_request_on_an_unclaimed_run_is_a_hint(backend: Harness) -> None:
    run_id = await backend.store.submit(NEW)
    async with listening(backend.events()) as listener:
        assert await backend.store.request_cancel(run_id)
        hints = await wait_for(lambda: listener.for_run(run_id), what="cancel hint")
    assert hints[0].cancel_requested is True and hints[0].worker_id is None and hints[0].claimable is False


async def test_progress_writes_are_not_hints(backend: Harness) -> None:
    run_id = await backend.store.submit(NEW)
    claim = await backend.store.claim(run_id, "w1")
    assert claim is not None
    async with listening(backend.events()) as listener:
        await listener.hold(backend, run_id)
        for epoch in range(1, 4):
            assert await backend.store.touch(claim.lease, {"progress": {"epoch": epoch}})
        # Hints arrive in commit order: once this one is in, any progress hint would be too.
        assert await backend.store.finish(claim.lease, Canceled())
        hints = await wait_for(lambda: listener.changes(run_id), what="final hint")
    assert [(h.op, h.status) for h in hints] == [("UPDATE", RunStatus.CANCELED)]


async def test_a_failing_sink_does_not_stop_the_stream(backend: Harness) -> None:
    async with listening(backend.events(), failing=True) as listener:
        first = await backend.store.submit(NEW)
        await wait_for(lambda: listener.for_run(first), what="first hint")
        second = await backend.store.submit(NEW)
        await wait_for(lambda: listener.for_run(second), what="second hint")
        assert listener.events.healthy


async def test_hints_carry_the_attempt_the_raw_status_and_deletes(backend: Harness) -> None:
    run_id = await backend.store.submit(NEW)
    claim = await backend.store.claim(run_id, "w1")
    assert claim is not None
    async with listening(backend.events()) as listener:
        await listener.hold(backend, run_id)
        # The web app's `stopped`, then its delete button.
        await backend.set_fields(run_id, status="stopped")
        await wait_for(lambda: listener.changes(run_id), what="stopped hint")
        await backend.delete_row(run_id)
        hints = await wait_for(lambda: len(listener.changes(run_id)) >= 2 and listener.changes(run_id))
    stopped, deleted = hints
    assert (stopped.op, stopped.status, stopped.raw_status) == ("UPDATE", None, "stopped")
    assert stopped.unknown_status and stopped.attempt == claim.lease.attempt == 1
    assert stopped.worker_id == "w1"
    assert (deleted.op, deleted.run_id, deleted.claimable) == ("DELETE", run_id, False)
