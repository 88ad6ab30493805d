"""The serving process: aiohttp's runner with errors from the HTTP parser itself (a malformed
request line or header, an unknown method) answered in JSON like every other error, and the
process tuning that thousands of live connections need."""

from __future__ import annotations

import gc
import logging
import resource

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
        # aiohttp's own version logs, and refuses once a response has started: keep that.
        super().handle_error(request, status, exc, message)
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


def freeze_start_up_objects() -> None:
    """Move everything alive after start-up (modules, the app, pools) out of the collector's
    reach: a full collection then walks only what requests and connections made since."""
    gc.collect()
    gc.freeze()
