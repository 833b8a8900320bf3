"""Helpers shared by the history and resume tests (test_history, test_resume, test_resume_property)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def until(cond: Callable[[], bool], timeout: float = 5.0, step: float = 0.005) -> bool:
    """Poll `cond` until it holds or `timeout` passes; returns its last value (assert on it)."""
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(step)
