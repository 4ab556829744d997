"""An in-process RunEvents: hints from a MemoryStore's change feed, or emitted by a test."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from loguru import logger

from agent.backends.memory.store import MemoryStore
from agent.domain.run import Hint
from agent.ports import HintSink


class MemoryEvents:
    """Delivers hints asynchronously, like a real stream; hints emitted while disconnected are lost."""

    # disconnect() and reconnect() simulate a dropped and re-established subscription; reconnect()
    # calls on_subscribed again, so the core runs its catch-up poll as it would on a real stream.

    def __init__(self, store: MemoryStore | None = None) -> None:
        self._sink: HintSink | None = None
        self._on_subscribed: Callable[[], None] | None = None
        self._connected = True
        self.subscriptions = 0
        self.delivered: list[Hint] = []
        self.dropped: list[Hint] = []
        self.followed: frozenset[str] = frozenset()  # the last set the core asked to follow
        if store is not None:
            store.watch(self.emit)

    @property
    def healthy(self) -> bool:
        return self._sink is not None and self._connected

    async def listen(self, sink: HintSink, on_subscribed: Callable[[], None]) -> None:
        """Subscribe until cancelled."""
        self._sink, self._on_subscribed = sink, on_subscribed
        try:
            if self._connected:
                self._subscribed()
            await asyncio.Event().wait()
        finally:
            self._sink = self._on_subscribed = None

    def follow(self, run_ids: frozenset[str]) -> None:
        """Recorded only: the store's change feed already carries every change of every run."""
        self.followed = run_ids

    def emit(self, hint: Hint) -> bool:
        """Queue `hint` for the listener; False (and the hint is lost) while nobody listens."""
        if not self.healthy:
            self.dropped.append(hint)
            return False
        asyncio.get_running_loop().call_soon(self._deliver, hint)
        return True

    def disconnect(self) -> None:
        self._connected = False

    def reconnect(self) -> None:
        self._connected = True
        if self._sink is not None:
            self._subscribed()

    def _subscribed(self) -> None:
        self.subscriptions += 1
        if self._on_subscribed is not None:
            try:
                self._on_subscribed()
            except Exception:
                logger.exception("on_subscribed callback failed")

    def _deliver(self, hint: Hint) -> None:
        sink = self._sink
        if sink is None or not self._connected:
            self.dropped.append(hint)
            return
        self.delivered.append(hint)
        try:
            sink(hint)
        except Exception:
            logger.bind(run_id=hint.run_id).exception("hint sink failed")
