"""Waiting for a condition that another process or thread brings about."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def eventually(check: Callable[[], T], timeout: float = 20.0, interval: float = 0.2) -> T:
    """Retry until ``check`` holds: it returns without raising and does not return False
    (a field not written yet counts as not holding). Returns what ``check`` returned."""
    deadline = time.time() + timeout
    while True:
        try:
            result = check()
            if result is False:
                raise AssertionError(f"{getattr(check, '__name__', 'check')} does not hold yet")
            return result
        except (AssertionError, KeyError, TypeError):
            if time.time() > deadline:
                raise
            time.sleep(interval)


async def until(condition: Callable[[], bool], within: float = 10.0, what: str = "") -> None:
    """Wait on the event loop until ``condition()`` holds: for a state the server reaches by
    itself (a request running, another queued), where a fixed sleep flakes on a loaded machine."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what or getattr(condition, '__name__', 'condition')}")
        await asyncio.sleep(0.01)
