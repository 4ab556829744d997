"""The agent loop: hear hints (events and polls), claim while slots are free, run, shut down cleanly.

Hints are handled concurrently, one lane per run id (serialised within a run), so a claim or a
poll that keeps retrying against a backend that is down never holds up another run's cancel.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Literal, TypeVar

from loguru import logger

from agent.core.inflight import interrupt_for, interrupt_for_row
from agent.core.pipeline import (
    Deps,
    Interrupt,
    RunControl,
    drain_final_writes,
    execute,
    finalize,
    unexpected_failure,
)
from agent.core.slots import Allocation, SlotPool, devices_needed
from agent.core.supervisor import Supervisor
from agent.domain.errors import BackendError, BackendUnavailable, InvalidRequest
from agent.domain.request import parse_request
from agent.domain.run import Canceled, Claimed, Failed, Hint, Lease, RunRow, WorkerInfo, WorkerState
from agent.domain.status import RunStatus, WorkerStatus
from agent.ports import Health, RunEvents
from agent.retry import transient

K = TypeVar("K")
V = TypeVar("V")
Service = Callable[[], Awaitable[None]]
_NEEDS_REMEMBERED = 4096  # device needs of runs seen lately, so a poll does not re-read big runs
_HEARD_REMEMBERED = 4096  # run ids announced by events, to tell what a catch-up poll found missing

ShutdownMode = Literal["wait", "release"]

FORCED_EXIT_MESSAGE = (
    "The agent was forced to exit (a second stop signal) while this run was still training; "
    "submit it again to retrain."
)


@dataclass(frozen=True)
class LoopSettings:
    """What the agent loop is told; the defaults live in agent.config (built in wiring)."""

    worker: WorkerInfo
    max_concurrent_runs: int
    # The devices runs are pinned to; ("cpu",) trains on the CPU. Slots: max_concurrent_runs.
    devices: tuple[str, ...]
    poll_interval: float
    degraded_poll_interval: float
    heartbeat_interval: float
    stale_after: float
    max_attempts: int
    shutdown_mode: ShutdownMode


class Agent:
    def __init__(
        self,
        deps: Deps,
        events: RunEvents,
        settings: LoopSettings,
        services: Mapping[str, Service] | None = None,
    ) -> None:
        """`services`: extra background tasks served with the agent (the metrics endpoint)."""
        self.deps = deps
        self.events = events
        self.settings = settings
        self.worker_id = settings.worker.worker_id
        self.hints: asyncio.Queue[Hint] = asyncio.Queue()
        self.runs: dict[str, RunControl] = {}
        self.ready = asyncio.Event()
        self.slots = SlotPool(settings.devices, settings.max_concurrent_runs)
        self._services = dict(services or {})
        self._lanes: dict[str, deque[Hint]] = {}
        self._lane_tasks: set[asyncio.Task[None]] = set()
        self._claiming: set[str] = set()
        self._cancel_pending: set[str] = set()
        self._claim_gate = asyncio.Semaphore(max(1, settings.max_concurrent_runs))
        self._needs: OrderedDict[str, int] = OrderedDict()
        self._heard: OrderedDict[str, None] = OrderedDict()
        self._catch_up = False
        self._subscriptions = 0
        self._alive = False
        self._database_ok = False
        self._poll_ok = False
        self._run_tasks: set[asyncio.Task[None]] = set()
        self._poll_now = asyncio.Event()
        self._stop = asyncio.Event()
        self._stop_reason = ""
        self._stopping = False
        self._degraded_logged = False
        self._log = logger.bind(worker=self.worker_id)

    def stop(self, reason: str) -> None:
        """Begin a clean shutdown; the first reason given is the one reported."""
        if not self._stop.is_set():
            self._stop_reason = reason
            self._log.bind(reason=reason).info("shutdown requested")
            self._stop.set()

    @property
    def free_slots(self) -> int:
        return 0 if self._stopping else self.slots.free

    def health(self) -> Health:
        return Health(
            alive=self._alive,
            database=self._database_ok,
            stream=self.events.healthy,
            polling=self._poll_ok,
            slots_busy=self.slots.busy,
            slots_total=self.slots.total,
        )

    async def run(self) -> str:
        """Serve until stop() is called; returns the shutdown reason."""
        sup = Supervisor(on_fatal=self.stop)
        for name, service in self._services.items():
            sup.spawn(name, service)
        self._poll_now.set()
        await self._register(WorkerStatus.ONLINE)
        self._alive = True
        sup.spawn("events", lambda: self.events.listen(self._hear, self._on_subscribed))
        sup.spawn("poller", self._poller)
        sup.spawn("dispatcher", self._dispatcher)
        sup.spawn("rescuer", self._rescuer)
        sup.spawn("registry", self._registry)
        self._log.bind(slots=self.slots.total, devices=list(self.slots.devices)).info("agent started")
        await self._stop.wait()

        # No more claims (free_slots is 0 from here), but the dispatcher keeps serving the events
        # of runs still in flight, so a cancel during a wait-mode shutdown stops its run at once.
        self._stopping = True
        await sup.stop("poller", "rescuer")
        mode = self.settings.shutdown_mode
        if self.runs:
            self._log.bind(mode=mode, runs=list(self.runs)).info("waiting for runs in flight")
        if mode == "release":
            for control in self.runs.values():
                control.interrupt("release")
        if self._run_tasks:
            await asyncio.wait(set(self._run_tasks))
        await drain_final_writes()
        await sup.stop("events", "poller", "dispatcher", "rescuer", "registry")
        for lane in set(self._lane_tasks):
            lane.cancel()
        await asyncio.gather(*self._lane_tasks, return_exceptions=True)
        await self._register(WorkerStatus.OFFLINE)
        self._alive = False
        await sup.stop()
        self._log.bind(reason=self._stop_reason).info("agent stopped")
        return self._stop_reason

    async def abort(self, within: float = 2.0) -> None:
        """Forced exit: no trainer left behind, and no run left `running` for a rescue to retrain.

        One best-effort write per run: released in `release` mode, failed with a message saying why
        in `wait` mode (its operator asked for it to finish, then refused to wait), canceled when a
        cancel was under way.
        """
        leases = {run_id: (control.lease, control.interrupted()) for run_id, control in self.runs.items()}
        # The pipelines go first, so none of them writes `failed: exited with code -9` over ours.
        for task in self._run_tasks:
            task.cancel()
        self.kill_children()
        store = self.deps.store

        async def settle(lease: Lease, why: str | None) -> tuple[str, bool]:
            if why == "lost":
                return "lost", False
            if why == "cancel":
                return "canceled", await store.finish(lease, Canceled())
            if self.settings.shutdown_mode == "release" or why == "release":
                return "released", await store.release(lease)
            return "failed", await store.finish(lease, Failed(FORCED_EXIT_MESSAGE))

        async def one(run_id: str, lease: Lease, why: str | None) -> None:
            log = self._log.bind(run_id=run_id)
            try:
                outcome, landed = await settle(lease, why)
            except (BackendUnavailable, BackendError) as exc:
                log.warning("forced exit: could not settle the run, a rescue will: {}", exc)
                return
            log.bind(outcome=outcome, landed=landed).warning("forced exit: run settled")

        try:
            async with asyncio.timeout(within):
                await asyncio.gather(*(one(run_id, *entry) for run_id, entry in leases.items()))
        except TimeoutError:
            self._log.bind(seconds=within).warning("forced exit: the database did not answer in time")

    def kill_children(self) -> None:
        """Last resort on a second signal: no trainer may outlive the agent."""
        for control in list(self.runs.values()):
            if control.pid is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(control.pid, signal.SIGKILL)

    def _hear(self, hint: Hint) -> None:
        # Called from event callbacks: only enqueue, never raise.
        try:
            if hint.op != "POLL":
                _remember(self._heard, hint.run_id, None, _HEARD_REMEMBERED)
            self.hints.put_nowait(hint)
        except Exception:  # pragma: no cover - an unbounded queue does not refuse
            self._log.exception("could not enqueue a hint")

    def _on_subscribed(self) -> None:
        self._log.info("event stream subscribed: catch-up poll")
        self.deps.metrics.stream_subscribed(first=self._subscriptions == 0)
        self._subscriptions += 1
        self.ready.set()
        self._degraded_logged = False
        self._catch_up = True
        self._poll_now.set()

    async def _poller(self) -> None:
        """The truth behind the hints: claimable and cancel-requested runs, on a slow timer."""
        last_poll = float("-inf")
        started = time.monotonic()
        while True:
            # Wake at least every degraded interval so that a stream going down shortens the wait.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.degraded_poll_interval):
                    await self._poll_now.wait()
            healthy = self.events.healthy
            # The first subscription takes a moment: only a stream that was up, or that stays down
            # for a whole degraded interval, is worth a warning.
            waited = time.monotonic() - started
            settling = not self.ready.is_set() and waited < self.settings.degraded_poll_interval
            if not healthy and not self._degraded_logged and not settling:
                self._log.bind(interval=self.settings.degraded_poll_interval).warning(
                    "event stream down: polling faster until it is back"
                )
                self._degraded_logged = True
            interval = self.settings.poll_interval if healthy else self.settings.degraded_poll_interval
            if not self._poll_now.is_set() and time.monotonic() - last_poll < interval:
                continue
            self._poll_now.clear()
            last_poll = time.monotonic()
            await self._poll_once()

    async def _poll_once(self) -> None:
        limit = max(8, 4 * max(1, self.free_slots))
        catch_up, self._catch_up = self._catch_up, False
        try:
            found = await transient("poll", lambda: self.deps.store.poll(limit), within=10.0)
        except (BackendUnavailable, BackendError) as exc:
            self._poll_ok = self._database_ok = False
            self._log.warning("poll failed: {}", exc)
            return
        self._poll_ok = self._database_ok = True
        if catch_up:
            missed = [r for r in found.claimable if r not in self._heard and r not in self.runs]
            self.deps.metrics.catch_up(len(missed))
            if missed:
                self._log.bind(runs=missed).info("catch-up poll found runs the event stream missed")
        for run_id in found.cancel_unclaimed:
            self._hear(Hint(run_id, "POLL", claimable=False, cancel_requested=True))
        if self.free_slots > 0:
            for run_id in found.claimable:
                self._hear(Hint(run_id, "POLL", claimable=True))

    async def _dispatcher(self) -> None:
        """Route each hint to its run's lane at once; lanes run concurrently, in order within a run."""
        while True:
            hint = await self.hints.get()
            control = self.runs.get(hint.run_id)
            why = None if control is None else interrupt_for(hint, control.lease)
            if control is not None and why is not None:
                # No I/O on this path: whatever the run's lane is doing, the child gets the stop now.
                control.interrupt(why)
            elif hint.cancel_requested and hint.run_id in self._claiming:
                self._cancel_pending.add(hint.run_id)
            lane = self._lanes.get(hint.run_id)
            if lane is not None:
                lane.append(hint)
                continue
            self._lanes[hint.run_id] = deque([hint])
            task = asyncio.create_task(self._drain_lane(hint.run_id), name=f"hints-{hint.run_id}")
            self._lane_tasks.add(task)
            task.add_done_callback(self._lane_tasks.discard)

    async def _drain_lane(self, run_id: str) -> None:
        lane = self._lanes[run_id]
        try:
            while lane:
                hint = lane.popleft()
                try:
                    await self._handle(hint)
                except Exception as exc:
                    # Nothing one run carries may stop its lane, and with it that run's later hints
                    # (a cancel among them).
                    self._log.bind(run_id=hint.run_id, error=type(exc).__name__).opt(exception=exc).error(
                        "hint handling failed; going on"
                    )
        finally:
            del self._lanes[run_id]

    async def _handle(self, hint: Hint) -> None:
        control = self.runs.get(hint.run_id)
        if control is not None:
            if hint.op == "CHECK":
                why = await self._check(control.lease)
            else:
                why = interrupt_for(hint, control.lease)
            if why is not None:
                control.interrupt(why)
            return
        unclaimed = hint.worker_id is None and hint.status in (None, RunStatus.QUEUED, RunStatus.RUNNING)
        if hint.cancel_requested and unclaimed:
            try:
                if await transient("cancel unclaimed", lambda: self.deps.store.cancel_unclaimed(hint.run_id)):
                    self._log.bind(run_id=hint.run_id).info("canceled before any worker claimed it")
            except (BackendUnavailable, BackendError) as exc:
                self._log.bind(run_id=hint.run_id).warning("cancel of unclaimed run failed: {}", exc)
            return
        if hint.claimable and self.free_slots > 0:
            await self._try_claim(hint.run_id, hint.image)

    async def _check(self, lease: Lease) -> Interrupt | None:
        """Read a held run's row, for the changes its feed may have missed before it started."""
        try:
            row = await transient("run check", lambda: self.deps.store.get(lease.run_id), within=10.0)
        except (BackendUnavailable, BackendError) as exc:
            # The run's fenced writes still notice a lost lease, a little later.
            self._log.bind(run_id=lease.run_id).warning("could not check a held run: {}", exc)
            return None
        return interrupt_for_row(row, lease)

    async def _try_claim(self, run_id: str, image: RunRow | None = None) -> None:
        """Claim `run_id` if this host has the devices it needs free now; start it if we win."""
        log = self._log.bind(run_id=run_id)
        # The gate lets as many claims proceed at once as there are slots: a burst of hints (a
        # batch of inserts) reads and claims a few runs, and the rest find no free slot and stop.
        async with self._claim_gate:
            if self.free_slots <= 0 or run_id in self.runs or run_id in self._claiming:
                return
            need = await self._need(run_id, image)
            if need is None:
                return
            if not self.slots.can_ever_fit(need):
                await self._too_big(run_id, need)
                return
            allocation = self.slots.acquire(run_id, need)
            if allocation is None:
                log.bind(need=need, free=self.slots.free).debug("not enough free slots: left for later")
                return
            self._claiming.add(run_id)
            try:
                claimed = await self._claim(run_id)
            finally:
                self._claiming.discard(run_id)
            if claimed is None:
                self.slots.release(run_id)
                self._cancel_pending.discard(run_id)
                return
            self._start(claimed, allocation)

    async def _need(self, run_id: str, image: RunRow | None) -> int | None:
        """How many devices the run asks for, read before claiming; None when it is not claimable."""
        # Read first, rather than claim and release what does not fit: a claim bumps the row's
        # attempt (rescue fails a run after max_attempts) and wakes every agent with an UPDATE.
        # An INSERT event's image of the row is as good as a read, one round trip sooner.
        known = self._needs.get(run_id)
        if known is not None:
            return known
        row = image
        if row is None:
            try:
                row = await transient("claim read", lambda: self.deps.store.get(run_id), within=10.0)
            except (BackendUnavailable, BackendError) as exc:
                self._log.bind(run_id=run_id).warning("could not read a run before claiming: {}", exc)
                return None
        if row is None or row.worker_id is not None or row.started_at is not None or row.cancel_requested:
            self.deps.metrics.claim_conflict()
            return None
        need = _need_of(row)
        _remember(self._needs, run_id, need, _NEEDS_REMEMBERED)
        return need

    async def _too_big(self, run_id: str, need: int) -> None:
        """Leave a run for a bigger host, or fail it when no registered worker could ever run it."""
        log = self._log.bind(run_id=run_id, need=need, here=self.slots.largest_need)
        try:
            largest = await transient("largest worker", self.deps.store.largest_worker, within=10.0)
        except (BackendUnavailable, BackendError) as exc:
            log.warning("could not read the worker registry: {}", exc)
            return
        if largest >= need:
            log.bind(largest=largest).debug("run needs more devices than this host has: left for others")
            return
        claimed = await self._claim(run_id)
        if claimed is None:
            return
        message = (
            f"The run asks for {need} GPUs, but no worker has more than {largest}: "
            "ask for fewer devices, or start an agent with more (DEVICES)."
        )
        await finalize(self.deps, claimed.lease, Failed(message), log)

    async def _claim(self, run_id: str) -> Claimed | None:
        claimed = await self._claim_once(run_id)
        if claimed is None:
            self.deps.metrics.claim_conflict()
            return None
        created = claimed.row.created_at
        pickup = None if created is None else (datetime.now(UTC) - created).total_seconds()
        self.deps.metrics.run_claimed(pickup)
        return claimed

    async def _claim_once(self, run_id: str) -> Claimed | None:
        store = self.deps.store
        try:
            return await store.claim(run_id, self.worker_id)
        except BackendError as exc:
            self._log.bind(run_id=run_id).warning("claim failed: {}", exc)
            return None
        except BackendUnavailable as exc:
            # The update may have committed with its answer lost: the row says who won.
            self._log.bind(run_id=run_id).warning("claim answer lost, reconciling: {}", exc)
        except Exception as exc:
            # The claim may have committed and its row be unreadable: if the row says we won, the
            # run is failed below, not left running with nobody to finish it.
            self._log.bind(run_id=run_id, error=type(exc).__name__).warning("claimed row unreadable: {}", exc)
        try:
            row = await transient("claim reconcile", lambda: store.get(run_id))
        except (BackendUnavailable, BackendError) as exc:
            self._log.bind(run_id=run_id).warning("claim reconcile failed: {}", exc)
            return None
        except Exception as exc:
            self._log.bind(run_id=run_id, error=type(exc).__name__).warning(
                "claimed row unreadable, skipped: {}", exc
            )
            return None
        if row is not None and row.worker_id == self.worker_id and row.status == RunStatus.RUNNING:
            return Claimed(Lease(run_id, self.worker_id, row.attempt), row)
        return None

    def _start(self, claimed: Claimed, allocation: Allocation) -> None:
        control = RunControl(claimed.lease)
        run_id = claimed.lease.run_id
        self.runs[run_id] = control
        self.events.follow(frozenset(self.runs))
        if run_id in self._cancel_pending or claimed.row.cancel_requested:
            # The cancel came while the claim was in flight.
            control.interrupt("cancel")
        self._cancel_pending.discard(run_id)
        self._log.bind(run_id=run_id, devices=list(allocation.devices)).info("run holds devices")
        task = asyncio.create_task(self._run_one(claimed, control, allocation), name=f"run-{run_id}")
        self._run_tasks.add(task)
        task.add_done_callback(self._run_tasks.discard)

    async def _run_one(self, claimed: Claimed, control: RunControl, allocation: Allocation) -> None:
        run_id = claimed.lease.run_id
        deps = replace(self.deps, devices=allocation)
        try:
            await self._register(WorkerStatus.BUSY)
            await execute(deps, claimed, control)
        except Exception as exc:
            # execute() fails the run on any error of its own; reaching here is a bug. Still a
            # failure of this run, not a lost host: fail it rather than leave it to rescue.
            log = self._log.bind(run_id=run_id, attempt=claimed.lease.attempt)
            log.bind(error=type(exc).__name__).opt(exception=exc).error("run pipeline crashed")
            try:
                await finalize(self.deps, claimed.lease, Failed(unexpected_failure(exc)), log)
            except Exception as again:
                log.bind(error=type(again).__name__).error("could not fail the crashed run: {}", again)
        finally:
            self.runs.pop(run_id, None)
            self.events.follow(frozenset(self.runs))
            self.slots.release(run_id)
            if not self._stopping:
                self._poll_now.set()
                await self._register(WorkerStatus.BUSY if self.runs else WorkerStatus.ONLINE)

    async def _rescuer(self) -> None:
        """Put runs of dead hosts back in the queue (or fail them after too many attempts)."""
        interval = max(1.0, self.settings.stale_after / 4)
        while True:
            await asyncio.sleep(interval)
            try:
                report = await self.deps.store.rescue_stale(
                    self.settings.stale_after, self.settings.max_attempts
                )
            except (BackendUnavailable, BackendError) as exc:
                self._log.warning("rescue failed: {}", exc)
                continue
            if report.requeued or report.failed:
                self._log.bind(requeued=list(report.requeued), failed=list(report.failed)).warning(
                    "rescued runs of workers that stopped heartbeating"
                )
                self._poll_now.set()

    async def _registry(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval)
            await self._register(WorkerStatus.BUSY if self.runs else WorkerStatus.ONLINE)

    async def _register(self, status: WorkerStatus) -> None:
        free = 0 if status == WorkerStatus.OFFLINE else self.free_slots
        state = WorkerState(status, tuple(self.runs), free_slots=free)
        try:
            await transient(
                "worker registry",
                lambda: self.deps.store.register_worker(self.settings.worker, state),
                within=5.0,
            )
        except (BackendUnavailable, BackendError) as exc:
            self._database_ok = False
            self._log.warning("worker registry update failed: {}", exc)
            return
        self._database_ok = True


def _need_of(row: RunRow) -> int:
    """Devices the row asks for; an invalid request needs one slot, where the pipeline fails it."""
    try:
        return devices_needed(parse_request(row).device)
    except InvalidRequest:
        return 1


def _remember(cache: OrderedDict[K, V], key: K, value: V, limit: int) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > limit:
        cache.popitem(last=False)
