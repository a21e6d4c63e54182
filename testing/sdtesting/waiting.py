"""Waiting for a condition that another process or thread brings about."""

from __future__ import annotations

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
