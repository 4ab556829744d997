"""The memory fakes' test hooks: injected failures, a simulated dropped stream, a settable clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.backends.memory import MemoryBlobs, MemoryEvents, MemoryStore
from agent.domain.errors import BackendError, BackendUnavailable
from agent.domain.run import Hint, NewRun
from tests.contract.conftest import listening
from tests.util import wait_for


async def test_fail_next_raises_for_the_named_ops_only_and_then_stops() -> None:
    store = MemoryStore()
    store.fail_next(times=2, ops={"claim"})
    run_id = await store.submit(NewRun("/a.yaml"))
    for _ in range(2):
        with pytest.raises(BackendUnavailable):
            await store.claim(run_id, "w1")
    assert await store.claim(run_id, "w1") is not None

    store.fail_next(BackendError("permanent"))
    with pytest.raises(BackendError, match="permanent"):
        await store.poll(10)
    assert await store.poll(10) is not None


async def test_hints_are_lost_while_disconnected_and_reconnect_resubscribes() -> None:
    store = MemoryStore()
    events = MemoryEvents(store)
    async with listening(events) as listener:
        events.disconnect()
        assert events.healthy is False
        lost = await store.submit(NewRun("/a.yaml"))
        events.reconnect()
        assert events.healthy and listener.subscriptions == 2
        seen = await store.submit(NewRun("/b.yaml"))
        await wait_for(lambda: listener.for_run(seen), what="hint after reconnect")
        assert listener.for_run(lost) == []
        assert [h.run_id for h in events.dropped] == [lost]

        assert events.emit(Hint("manual", "POLL", claimable=True))
        await wait_for(lambda: listener.for_run("manual"), what="emitted hint")


async def test_clock_drives_staleness() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    store = MemoryStore(clock=lambda: now)
    claim = await store.claim(await store.submit(NewRun("/a.yaml")), "w1")
    assert claim is not None
    assert (await store.rescue_stale(60, 3)).requeued == ()
    now += timedelta(seconds=61)
    assert (await store.rescue_stale(60, 3)).requeued == (claim.lease.run_id,)


async def test_blobs_record_content_types_and_fail_on_demand(tmp_path: Path) -> None:
    blobs = MemoryBlobs()
    source = tmp_path / "results.csv"
    source.write_text("epoch,map\n1,0.5\n")
    blobs.fail_next(ops={"upload"})
    with pytest.raises(BackendUnavailable):
        await blobs.upload("k/results.csv", source, "text/csv")
    assert await blobs.upload("k/results.csv", source, "text/csv") == "memory://artifacts/k/results.csv"
    assert blobs.objects["k/results.csv"].content_type == "text/csv"
