"""Log setup: loguru to stderr, human-readable or JSON lines, bound fields shown."""

from __future__ import annotations

import sys

from loguru import logger

_TEXT = (
    "<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
    "<level>{message}</level> <dim>{extra}</dim>"
)


def setup(level: str = "INFO", json: bool = False) -> None:
    logger.remove()
    if json:
        logger.add(sys.stderr, level=level.upper(), serialize=True, enqueue=False)
    else:
        logger.add(sys.stderr, level=level.upper(), format=_TEXT, colorize=None)
