"""What the long-running tasks (relay, hub, doorbell) share: retry delays with jitter, and
stopping them without hanging a shutdown."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


def stop_requested() -> bool:
    """True once the current task has been asked to cancel.

    redis-py's reads nest their own timeouts, and on Python 3.11 a cancellation that meets an
    expiring timeout can surface as a timeout (or a None reply) instead of CancelledError.
    Long-running loops check this so that shutdown never hangs on such a swallowed cancel.
    """
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def stop_background(tasks: list[asyncio.Task[None]], patience: float = 5.0) -> None:
    """Cancel background tasks and wait for them, cancelling again if a cancel was swallowed
    (see stop_requested); give up after `patience` seconds rather than hang a shutdown."""
    deadline = asyncio.get_running_loop().time() + patience
    pending = {task for task in tasks if not task.done()}
    while pending and asyncio.get_running_loop().time() < deadline:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.5)
    for task in pending:
        log.error("background task %s did not stop", task.get_name())


class Backoff:
    """Exponential retry delays with jitter, back to the first once a connection has held.

    Jitter keeps the replicas (and the processes of one replica) from retrying in step after
    a shared dependency blips; resetting keeps short blips from growing the delay forever.
    """

    def __init__(self, first: float, cap: float) -> None:
        self._first = first
        self._cap = cap
        self._next = first

    def reset(self) -> None:
        self._next = self._first

    def delay(self) -> float:
        """The next delay: between half and all of the current step, which then doubles."""
        step = self._next
        self._next = min(step * 2, self._cap)
        return random.uniform(step / 2, step)

    async def sleep(self) -> None:
        await asyncio.sleep(self.delay())


class ServerCancelled(Exception):
    """A CancelledError nobody asked for: aiopg reports a statement the server cancelled
    (statement_timeout, a lock wait) that way. A failure to retry, not the task's end."""


async def supervise(
    attempt: Callable[[], Awaitable[None]],
    backoff: Backoff,
    failed: Callable[[Exception], None],
) -> None:
    """Run `attempt` again and again, `failed` told of each failure and `backoff` waited
    between tries, until this task is cancelled. `attempt` resets `backoff` once it holds."""
    while True:
        try:
            await attempt()
        except asyncio.CancelledError:
            if stop_requested():
                raise
            failed(ServerCancelled())
        except Exception as exc:
            if stop_requested():
                raise asyncio.CancelledError() from exc
            failed(exc)
        if stop_requested():
            raise asyncio.CancelledError()
        await backoff.sleep()
