"""The PostgREST store against the stand-in: claim races, lost answers, and errors at the boundary."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from agent.backends.supabase import SupabaseBackends, SupabaseStore, connect_client, open_supabase
from agent.backends.supabase.transport import http_client
from agent.domain.errors import BackendError, BackendUnavailable
from agent.domain.run import Completed, NewRun
from agent.domain.status import RunStatus
from agent.retry import transient, until_it_lands
from tests.standin import StandIn
from tests.supabase.harness import settings_for

NEW = NewRun("/data/a.yaml", "YOLOv8n", {"epochs": 1})
StoreFactory = Callable[..., Awaitable[SupabaseStore]]


class LoseAnswers(httpx.AsyncBaseTransport):
    """A network that delivers requests but loses the answers of the next `count` PATCHes."""

    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self.count = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        if request.method == "PATCH" and self.count > 0:
            self.count -= 1
            await response.aread()
            await response.aclose()
            raise httpx.ReadError("connection reset by peer", request=request)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


@pytest.fixture
async def stores(standin: StandIn) -> AsyncIterator[StoreFactory]:
    """More agents' stores on the same project, each with its own HTTP client."""
    closers = []

    async def make(
        *, key: str | None = None, transport: httpx.AsyncBaseTransport | None = None
    ) -> SupabaseStore:
        http = http_client(transport=transport)
        closers.append(http.aclose)
        return SupabaseStore(await connect_client(standin.url, key or standin.service_role_key, http))

    yield make
    for close in closers:
        await close()


async def test_eight_agents_claiming_the_same_runs_claim_each_once(
    supa: SupabaseBackends, stores: StoreFactory
) -> None:
    run_ids = [await supa.admin.submit(NEW) for _ in range(40)]
    agents = [await stores() for _ in range(8)]

    async def agent(i: int) -> list[str]:
        won = []
        for run_id in run_ids[i:] + run_ids[:i]:  # each starts elsewhere, so they collide all along
            if await agents[i].claim(run_id, f"w{i}") is not None:
                won.append(run_id)
        return won

    won = [run_id for batch in await asyncio.gather(*(agent(i) for i in range(8))) for run_id in batch]
    assert sorted(won) == sorted(run_ids)
    for run_id in run_ids:
        row = await supa.admin.get(run_id)
        assert row is not None and row.status is RunStatus.RUNNING and row.attempt == 1


async def test_a_claim_whose_answer_is_lost_is_unavailable_and_the_row_tells_the_winner(
    supa: SupabaseBackends, standin: StandIn, stores: StoreFactory
) -> None:
    run_id = await supa.admin.submit(NEW)
    network = LoseAnswers()
    unlucky = await stores(transport=network)
    network.count = 1
    with pytest.raises(BackendUnavailable):
        await unlucky.claim(run_id, "w1")
    # What agent.core.agent.Agent._claim does after BackendUnavailable: read the row.
    row = await supa.admin.get(run_id)
    assert row is not None and row.worker_id == "w1"
    assert row.attempt == 1 and row.status is RunStatus.RUNNING
    assert await supa.store.claim(run_id, "w2") is None


async def test_a_final_write_whose_answer_was_lost_lands_on_retry(
    supa: SupabaseBackends, standin: StandIn, stores: StoreFactory
) -> None:
    run_id = await supa.admin.submit(NEW)
    claim = await supa.store.claim(run_id, "w1")
    assert claim is not None
    network = LoseAnswers()
    unlucky = await stores(transport=network)
    outcome = Completed({"mAP": 0.5}, "http://x/best.pt")
    network.count = 1
    with pytest.raises(BackendUnavailable):
        await unlucky.finish(claim.lease, outcome)
    # The retry matches no live row but finds it finished by this lease: landed, not lost.
    assert await until_it_lands("final write", lambda: unlucky.finish(claim.lease, outcome)) is True
    row = await supa.admin.get(run_id)
    assert row is not None and row.results == {"mAP": 0.5} and row.trained_model_url == "http://x/best.pt"


async def test_5xx_answers_are_unavailable_and_retried_by_the_core(
    supa: SupabaseBackends, standin: StandIn
) -> None:
    run_id = await supa.admin.submit(NEW)
    standin.faults.fail_next("rest", 1, status=503)
    with pytest.raises(BackendUnavailable, match="503"):
        await supa.store.poll(10)
    standin.faults.fail_next("rest", 3, status=502)
    claim = await transient("claim", lambda: supa.store.claim(run_id, "w1"), within=10.0)
    assert claim is not None and claim.lease.attempt == 1


async def test_a_refused_key_is_a_permanent_error(standin: StandIn, stores: StoreFactory) -> None:
    wrong = await stores(key=standin.anon_key[:-4] + "AAAA")
    with pytest.raises(BackendError) as caught:
        await wrong.poll(10)
    assert not isinstance(caught.value, BackendUnavailable)


async def test_an_unreachable_project_is_unavailable(tmp_path: Path) -> None:
    http = http_client(timeout=2.0)
    try:
        store = SupabaseStore(await connect_client("http://127.0.0.1:9", "k", http))
        with pytest.raises(BackendUnavailable):
            await store.poll(1)
    finally:
        await http.aclose()


async def test_open_supabase_creates_a_private_bucket_for_signed_urls(
    standin: StandIn, tmp_path: Path
) -> None:
    settings = settings_for(
        standin, tmp_path, artifact_url_mode="signed", supabase_artifacts_bucket="private-art"
    )
    backends = await open_supabase(settings)
    try:
        bucket = standin.storage.get_bucket("private-art")
        assert bucket is not None and bucket["public"] is False
    finally:
        await backends.close()
    # A second agent finds it there.
    backends = await open_supabase(settings)
    await backends.close()
