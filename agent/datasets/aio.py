"""Structured concurrency helpers: the first failure cancels the rest, and nothing is left running."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

T = TypeVar("T")


async def for_each(items: Iterable[T], fn: Callable[[T], Awaitable[None]], workers: int) -> None:
    """Run `fn` over `items` with at most `workers` at a time; the first failure cancels the rest."""
    iterator = iter(items)

    async def worker() -> None:
        for item in iterator:
            await fn(item)

    await gather_all([worker() for _ in range(max(1, workers))])


async def gather_all(coros: list[Awaitable[None]]) -> None:
    """Await every coroutine; on the first failure cancel the others and wait for them to end."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
