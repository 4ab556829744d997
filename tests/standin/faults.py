"""Switchable faults: what a flaky network or an overloaded Supabase does to its clients."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Literal

Service = Literal["rest", "storage", "realtime"]
SERVICES: tuple[Service, ...] = ("rest", "storage", "realtime")


class Faults:
    """Fault switches a test flips; the servers consult them on every request and frame."""

    def __init__(self) -> None:
        self._failures: dict[str, list[int]] = {s: [] for s in SERVICES}
        self._latency: dict[str, float] = dict.fromkeys(SERVICES, 0.0)
        self._realtime_refused = False
        self._stall_until = 0.0
        self._subscribed_delay: float | None = 0.0
        self._subscribed_released = asyncio.Event()
        self._subscribed_released.set()
        # Wired by the server: the switches that act on live connections and the listening socket.
        self._drop_websockets: Callable[[], int] = lambda: 0
        self._close_channels: Callable[[], int] = lambda: 0
        self._drop_subscriptions: Callable[[], int] = lambda: 0
        self._set_listening: Callable[[bool], Awaitable[None]] | None = None

    # Realtime ---------------------------------------------------------------------------------

    def realtime_down(self) -> int:
        """Drop every websocket now and refuse new ones (HTTP 503) until `realtime_up`."""
        self._realtime_refused = True
        return self._drop_websockets()

    def realtime_up(self) -> None:
        """Accept websockets again."""
        self._realtime_refused = False

    def drop_websockets(self) -> int:
        """Drop every websocket now (no close frame, like a network cut); reconnects are accepted."""
        return self._drop_websockets()

    def close_channels(self) -> int:
        """Shut every joined channel down from the server (system error + phx_close); sockets stay open."""
        return self._close_channels()

    def drop_subscriptions(self) -> int:
        """Forget every channel's Postgres subscriptions, silently (a cold restart of the change capture).

        Sockets and channels stay up and heartbeats are answered; no change reaches any channel until
        it joins again. Returns how many subscriptions were dropped.
        """
        return self._drop_subscriptions()

    def stall_realtime(self, seconds: float) -> None:
        """Hold every outgoing realtime frame for `seconds` from now; they are sent, in order, after."""
        self._stall_until = max(self._stall_until, time.monotonic() + seconds)

    def delay_subscribed(self, seconds: float | None = None) -> None:
        """Delay "Subscribed to PostgreSQL" by `seconds`, or hold it until `release_subscribed` (None)."""
        self._subscribed_delay = seconds
        self._subscribed_released.clear()

    def release_subscribed(self) -> None:
        """Send held "Subscribed to PostgreSQL" messages now and stop delaying new ones."""
        self._subscribed_delay = 0.0
        self._subscribed_released.set()

    @property
    def realtime_refused(self) -> bool:
        return self._realtime_refused

    def stall_remaining(self) -> float:
        return self._stall_until - time.monotonic()

    async def wait_subscribed(self) -> None:
        """Wait as long as the "Subscribed to PostgreSQL" fault says."""
        if self._subscribed_released.is_set():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._subscribed_delay):
                await self._subscribed_released.wait()

    # HTTP services ----------------------------------------------------------------------------

    def fail_next(self, service: Service, count: int = 1, status: int = 503) -> None:
        """Answer the next `count` requests of `service` with `status` (a websocket upgrade for realtime)."""
        self._failures[service].extend([status] * count)

    def latency(self, service: Service, seconds: float) -> None:
        """Add `seconds` before every request of `service` is handled (0 to stop)."""
        self._latency[service] = seconds

    def take_failure(self, service: Service) -> int | None:
        pending = self._failures[service]
        return pending.pop(0) if pending else None

    def latency_of(self, service: Service) -> float:
        return self._latency[service]

    # The listening socket -----------------------------------------------------------------------

    async def refuse_connections(self) -> None:
        """Close the listening socket: new TCP connections are refused; open ones keep working."""
        if self._set_listening is not None:
            await self._set_listening(False)

    async def accept_connections(self) -> None:
        """Listen again, on the same port."""
        if self._set_listening is not None:
            await self._set_listening(True)

    async def reset(self) -> None:
        """Every switch back to normal."""
        for pending in self._failures.values():
            pending.clear()
        self._latency = dict.fromkeys(SERVICES, 0.0)
        self._realtime_refused = False
        self._stall_until = 0.0
        self.release_subscribed()
        await self.accept_connections()
