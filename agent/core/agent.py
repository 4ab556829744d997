"""The agent loop: hear hints (events and polls), claim while a slot is free, run, shut down cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from dataclasses import dataclass
from typing import Literal

from loguru import logger

from agent.core.inflight import interrupt_for
from agent.core.pipeline import Deps, RunControl, drain_final_writes, execute, finalize, unexpected_failure
from agent.core.supervisor import Supervisor
from agent.domain.errors import BackendError, BackendUnavailable
from agent.domain.run import Canceled, Claimed, Failed, Hint, Lease, WorkerInfo, WorkerState
from agent.domain.status import RunStatus, WorkerStatus
from agent.ports import RunEvents
from agent.retry import transient

ShutdownMode = Literal["wait", "release"]

FORCED_EXIT_MESSAGE = (
    "The agent was forced to exit (a second stop signal) while this run was still training; "
    "submit it again to retrain."
)


@dataclass(frozen=True)
class LoopSettings:
    worker: WorkerInfo
    max_concurrent_runs: int = 1
    poll_interval: float = 60.0
    degraded_poll_interval: float = 5.0
    heartbeat_interval: float = 10.0
    stale_after: float = 120.0
    max_attempts: int = 3
    shutdown_mode: ShutdownMode = "wait"


class Agent:
    def __init__(self, deps: Deps, events: RunEvents, settings: LoopSettings) -> None:
        self.deps = deps
        self.events = events
        self.settings = settings
        self.worker_id = settings.worker.worker_id
        self.hints: asyncio.Queue[Hint] = asyncio.Queue()
        self.runs: dict[str, RunControl] = {}
        self.ready = asyncio.Event()
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
        return 0 if self._stopping else self.settings.max_concurrent_runs - len(self.runs)

    async def run(self) -> str:
        """Serve until stop() is called; returns the shutdown reason."""
        sup = Supervisor(on_fatal=self.stop)
        self._poll_now.set()
        await self._register(WorkerStatus.ONLINE)
        sup.spawn("events", lambda: self.events.listen(self._hear, self._on_subscribed))
        sup.spawn("poller", self._poller)
        sup.spawn("dispatcher", self._dispatcher)
        sup.spawn("rescuer", self._rescuer)
        sup.spawn("registry", self._registry)
        self._log.bind(slots=self.settings.max_concurrent_runs).info("agent started")
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
        await sup.stop()
        await self._register(WorkerStatus.OFFLINE)
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
            self.hints.put_nowait(hint)
        except Exception:  # pragma: no cover - an unbounded queue does not refuse
            self._log.exception("could not enqueue a hint")

    def _on_subscribed(self) -> None:
        self._log.info("event stream subscribed: catch-up poll")
        self.ready.set()
        self._degraded_logged = False
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
        try:
            found = await transient("poll", lambda: self.deps.store.poll(limit), within=10.0)
        except (BackendUnavailable, BackendError) as exc:
            self._log.warning("poll failed: {}", exc)
            return
        for run_id in found.cancel_unclaimed:
            self._hear(Hint(run_id, "POLL", claimable=False, cancel_requested=True))
        if self.free_slots > 0:
            for run_id in found.claimable:
                self._hear(Hint(run_id, "POLL", claimable=True))

    async def _dispatcher(self) -> None:
        while True:
            hint = await self.hints.get()
            try:
                await self._handle(hint)
            except Exception as exc:
                # Nothing one run carries may stop the dispatcher, and with it every other run.
                self._log.bind(run_id=hint.run_id, error=type(exc).__name__).opt(exception=exc).error(
                    "hint handling failed; going on"
                )

    async def _handle(self, hint: Hint) -> None:
        control = self.runs.get(hint.run_id)
        if control is not None:
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
            claimed = await self._claim(hint.run_id)
            if claimed is not None:
                self._start(claimed)

    async def _claim(self, run_id: str) -> Claimed | None:
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

    def _start(self, claimed: Claimed) -> None:
        control = RunControl(claimed.lease)
        run_id = claimed.lease.run_id
        self.runs[run_id] = control
        task = asyncio.create_task(self._run_one(claimed, control), name=f"run-{run_id}")
        self._run_tasks.add(task)
        task.add_done_callback(self._run_tasks.discard)

    async def _run_one(self, claimed: Claimed, control: RunControl) -> None:
        run_id = claimed.lease.run_id
        try:
            await self._register(WorkerStatus.BUSY)
            await execute(self.deps, claimed, control)
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
        state = WorkerState(status, tuple(self.runs))
        try:
            await transient(
                "worker registry",
                lambda: self.deps.store.register_worker(self.settings.worker, state),
                within=5.0,
            )
        except (BackendUnavailable, BackendError) as exc:
            self._log.warning("worker registry update failed: {}", exc)
