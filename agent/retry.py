"""Retry policy, in one place: which failures are retried, how long, and how it is logged."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from loguru import logger
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_delay,
    stop_never,
    wait_exponential_jitter,
)

from agent.domain.errors import BackendUnavailable

T = TypeVar("T")
RetryObserver = Callable[[str], None]

# Told the operation's name at every retry (the metrics adapter counts them); process-wide.
_observers: list[RetryObserver] = []


def add_retry_observer(observer: RetryObserver) -> Callable[[], None]:
    """Call `observer(what)` before every retry; returns a function that removes it."""
    _observers.append(observer)
    return lambda: _observers.remove(observer) if observer in _observers else None


def _log_retry(what: str) -> Callable[[RetryCallState], None]:
    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        logger.bind(op=what, attempt=state.attempt_number).warning("retrying after transient error: {}", exc)
        for observer in list(_observers):
            try:
                observer(what)
            except Exception:
                logger.bind(op=what).exception("retry observer failed")

    return before_sleep


async def transient(what: str, fn: Callable[[], Awaitable[T]], *, within: float = 30.0) -> T:
    """Retry `fn` on BackendUnavailable for up to `within` seconds, then re-raise."""
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type(BackendUnavailable),
        wait=wait_exponential_jitter(initial=0.1, max=5.0),
        stop=stop_after_delay(within),
        before_sleep=_log_retry(what),
        reraise=True,
    ):
        with attempt:
            return await fn()
    raise AssertionError("unreachable")  # pragma: no cover


async def until_it_lands(what: str, fn: Callable[[], Awaitable[T]]) -> T:
    """Final writes: retried on transient errors for as long as it takes."""
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type(BackendUnavailable),
        wait=wait_exponential_jitter(initial=0.2, max=15.0),
        stop=stop_never,
        before_sleep=_log_retry(what),
        reraise=True,
    ):
        with attempt:
            return await fn()
    raise AssertionError("unreachable")  # pragma: no cover
