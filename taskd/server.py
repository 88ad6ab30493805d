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
    go. So automatic full collections are off, and a full collection walks only what is new
    since the last one, which it then freezes (what survived a collection is most likely
    connection state). It runs every `FULL_EVERY` seconds, and sooner, after every `middle`
    (CPython's second threshold) young-generation collections, so that a burst of new
    connections costs many short pauses (about 20 ms at 700 connections apart) rather than
    one long one. Every `SWEEP_EVERY` timed runs the frozen part is thawed and walked too,
    so that cycles among old objects are freed in the end. Young collections stay automatic.
    """

    FULL_EVERY = 60.0
    SWEEP_EVERY = 10  # the whole heap, every ten minutes
    NEVER = 1 << 30  # a gen2 threshold no count reaches

    def __init__(self, full_every: float = FULL_EVERY, sweep_every: int = SWEEP_EVERY) -> None:
        self._full_every = full_every
        self._sweep_every = sweep_every
        self.runs = 0  # timed runs
        self.early_runs = 0  # runs after `middle` young collections
        self._saved_threshold = gc.get_threshold()
        self._promotions = 0  # young collections (generation 1) since the last run
        self._pending = False
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        gc.collect()
        gc.freeze()  # start-up objects: modules, the app, pools
        young, middle, _ = self._saved_threshold
        gc.set_threshold(young, middle, self.NEVER)
        self._loop = asyncio.get_running_loop()
        gc.callbacks.append(self._counted)
        self._task = self._loop.create_task(self._run(), name="taskd-gc")

    def _counted(self, phase: str, info: dict[str, int]) -> None:
        # Runs inside the collector, on whichever thread allocated: only count and schedule.
        if phase != "stop" or info["generation"] != 1 or self._loop is None:
            return
        self._promotions += 1
        if self._promotions >= self._saved_threshold[1] and not self._pending:
            self._pending = True
            self._loop.call_soon_threadsafe(self._collect_early)

    def _collect_early(self) -> None:
        self._collect()
        self.early_runs += 1

    def _collect(self) -> None:
        gc.collect()
        gc.freeze()
        self._promotions = 0
        self._pending = False

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._full_every)
            if (self.runs + 1) % self._sweep_every == 0:
                gc.unfreeze()
            self._collect()
            self.runs += 1

    async def stop(self) -> None:
        """Back to CPython's own collections, with nothing left frozen."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._counted)
        gc.set_threshold(*self._saved_threshold)
        gc.unfreeze()
