"""Owns the agent's background tasks: restarts one that dies, or stops the agent if it keeps dying."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable

from loguru import logger


class Supervisor:
    def __init__(
        self, on_fatal: Callable[[str], None], *, max_restarts: int = 5, window: float = 60.0
    ) -> None:
        self._on_fatal = on_fatal
        self._max_restarts = max_restarts
        self._window = window
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def spawn(self, name: str, factory: Callable[[], Awaitable[None]], *, restart: bool = True) -> None:
        self._tasks[name] = asyncio.create_task(self._guard(name, factory, restart), name=name)

    async def _guard(self, name: str, factory: Callable[[], Awaitable[None]], restart: bool) -> None:
        log = logger.bind(task=name)
        failures: deque[float] = deque()
        while True:
            try:
                await factory()
                log.debug("background task returned")
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                now = time.monotonic()
                failures.append(now)
                while failures and now - failures[0] > self._window:
                    failures.popleft()
                log.opt(exception=exc).error("background task crashed")
                if not restart or len(failures) > self._max_restarts:
                    self._on_fatal(f"background task {name} failed: {exc!r}")
                    return
                # Backoff between restarts, so a persistent fault does not spin.
                await asyncio.sleep(min(10.0, 0.2 * 2 ** (len(failures) - 1)))
                log.bind(restarts=len(failures)).warning("background task restarted")

    async def stop(self, *names: str) -> None:
        """Cancel the named tasks (all when none named) and wait for them to end."""
        targets = [self._tasks.pop(n) for n in (names or tuple(self._tasks)) if n in self._tasks]
        for t in targets:
            t.cancel()
        for t in targets:
            with contextlib.suppress(asyncio.CancelledError):
                await t
