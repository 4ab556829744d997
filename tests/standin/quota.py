"""Realtime's per-project event counter: one count per subscription a change is sent to.

Realtime adds, for every change it sends, the number of subscriptions it goes to (the ids in the
push) to the tenant's events counter; a rate counter averages the counts over a sliding window of
ticks, and while that average is over `max_events_per_second` the replication poller skips every
Postgres change of the project, without a word to any client (replication_poller.ex, the
`limit: %{triggered: true}` branch). The average is taken at each tick, so a burst is noticed at
the next tick and forgiven only once it has slid out of the window.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class EventQuota:
    """The counter, the window and the skip switch; `max_events_per_second=None` counts without limit."""

    max_events_per_second: float | None = None
    tick: float = 1.0  # seconds per bucket
    window: int = 10  # buckets averaged
    clock: Callable[[], float] = time.monotonic
    counted: int = 0  # over the server's life: what Realtime counted
    skipped_changes: int = 0  # changes not sent to anyone because the quota was crossed
    shadow_counted: int = 0  # what the shadow bindings (see Realtime.add_shadow) would have counted
    _start: float = field(default=0.0, init=False)
    _tick_index: int = field(default=0, init=False)
    _current: int = field(default=0, init=False)
    _buckets: deque[int] = field(default_factory=deque, init=False)
    _triggered: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Zero the counters and the window (a benchmark's start line)."""
        self._start = self.clock()
        self._tick_index = 0
        self._current = 0
        self._buckets = deque(maxlen=max(1, self.window))
        self._triggered = False
        self.counted = self.skipped_changes = self.shadow_counted = 0

    @property
    def elapsed(self) -> float:
        return self.clock() - self._start

    @property
    def triggered(self) -> bool:
        """Over the limit at the last tick: changes are being skipped."""
        self._roll()
        return self._triggered

    @property
    def average(self) -> float:
        """Events per second over the window, as of the last tick."""
        self._roll()
        return self._average()

    def add(self, events: int) -> None:
        self._roll()
        self._current += events
        self.counted += events

    def skip(self) -> None:
        self.skipped_changes += 1

    def _average(self) -> float:
        if not self._buckets:
            return 0.0
        return sum(self._buckets) / (len(self._buckets) * self.tick)

    def _roll(self) -> None:
        index = int((self.clock() - self._start) / self.tick)
        while self._tick_index < index:
            self._buckets.append(self._current)
            self._current = 0
            self._tick_index += 1
            if self._tick_index < index:
                # Ticks with nothing in them, up to the one in progress: at most a window's worth matters.
                missing = min(index - self._tick_index, self._buckets.maxlen or 1)
                self._buckets.extend([0] * missing)
                self._tick_index = index
            limit = self.max_events_per_second
            self._triggered = limit is not None and self._average() > limit
