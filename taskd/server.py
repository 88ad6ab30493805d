"""The serving process: aiohttp's runner with errors from the HTTP parser itself (a malformed
request line or header, an unknown method) answered in JSON like every other error, and the
process tuning that thousands of live connections need."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import resource
import time

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from taskd.errors import protocol_error_body

log = logging.getLogger(__name__)
# Where the hard limit is unlimited: the kernel's usual ceiling (fs.nr_open).
OPEN_FILES_CEILING = 1 << 20


class _JsonErrorHandler(RequestHandler):
    __slots__ = ()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # aiohttp's own version logs every one with a traceback at ERROR, so a client sending
        # junk fills the log: a client's mistake (4xx) is one line at INFO; a failure of ours
        # (5xx) keeps its traceback.
        if status >= 500:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
        else:
            self.logger.info("Error handling request from %s: %s", request.remote, exc or message)
        if request.writer.output_size > 0:
            raise ConnectionError("a response was sent already: the connection is broken")
        response = web.json_response(protocol_error_body(status), status=status)
        response.force_close()
        return response


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class Runner(web.AppRunner):
    """`web.AppRunner` whose connections answer protocol errors in API.md's JSON."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _Server  # the same server; only its connection handlers differ
        return server


def raise_open_file_limit() -> None:
    """Each live connection holds a file descriptor: lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = OPEN_FILES_CEILING if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.info("open-file limit raised from %d to %d (one per live connection)", soft, target)
        except (ValueError, OSError) as exc:
            log.warning("open-file limit stays at %d: %s", soft, exc)


# A collection that holds the event loop this long is worth a line in the log.
GC_PAUSE_LOGGED = 0.05


def watch_gc_pauses() -> None:
    """Log every garbage collection that stalls the process (all its clients wait for it)."""
    started: list[float] = [0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        pause = time.perf_counter() - started[0]
        if pause >= GC_PAUSE_LOGGED:
            log.warning(
                "gc: generation %d collection paused the process %.0f ms (%d collected)",
                info["generation"],
                pause * 1000,
                info["collected"],
            )

    gc.callbacks.append(callback)


class GcSchedule:
    """Full garbage collections on a schedule instead of CPython's own trigger.

    A full collection walks every object the process holds; at 10,000 live connections that
    is a million objects and a 0.3 to 0.6 s stall of every client, and CPython's trigger
    (a quarter more long-lived objects) fires every few seconds while connections come and
    go. So: automatic full collections are off; every `FULL_EVERY` seconds a full collection
    runs over what is new since the last one (the rest is frozen: it survived a collection
    and is most likely connection state), and every `SWEEP_EVERY` of those the frozen part is
    thawed and walked too, so that cycles among old objects are freed in the end.
    Young collections stay automatic: they walk only young objects.
    """

    FULL_EVERY = 60.0
    SWEEP_EVERY = 10  # the whole heap, every ten minutes
    NEVER = 1 << 30  # a gen2 threshold no count reaches

    def __init__(self, full_every: float = FULL_EVERY, sweep_every: int = SWEEP_EVERY) -> None:
        self._full_every = full_every
        self._sweep_every = sweep_every
        self.runs = 0
        self._saved_threshold = gc.get_threshold()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        gc.collect()
        gc.freeze()  # start-up objects: modules, the app, pools
        young, middle, _ = self._saved_threshold
        gc.set_threshold(young, middle, self.NEVER)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="taskd-gc")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._full_every)
            if (self.runs + 1) % self._sweep_every == 0:
                gc.unfreeze()
            gc.collect()
            gc.freeze()
            self.runs += 1

    async def stop(self) -> None:
        """Back to CPython's own collections, with nothing left frozen."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        gc.set_threshold(*self._saved_threshold)
        gc.unfreeze()
