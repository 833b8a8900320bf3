"""Small asyncio helpers."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel a background task and wait until it has really finished (no 'Task was destroyed' at exit)."""
    if task is None or task.done():
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def raise_if_cancelling() -> None:
    """Raise the cancellation a callee swallowed. On Python 3.11 `asyncio.wait_for` (which redis-py uses for its
    socket timeouts) returns the call's result instead of raising when the call completes just as the caller is
    cancelled (CPython gh-86296, fixed in 3.12); the task stays `cancelling()` and a loop that goes on never stops.
    Loops that must end when cancelled call this after each such await."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
