"""A real nginx running the shipped deploy/nginx.conf, for tests.

The configuration is rendered from the file itself: each line that ends in a `# @test:<name>`
marker is replaced as a whole (the listen address, the upstream servers, the temp paths, a
debugging header) and nothing else changes, so the tests exercise exactly what
docker-compose.yml mounts. See the header of deploy/nginx.conf.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import devtools

PROJECT = Path(__file__).resolve().parent.parent
CONFIG = PROJECT / "deploy" / "nginx.conf"
UPSTREAM_NAME = "taskd:8080 resolve"  # what the @test:upstream line names in production
STARTUP = 15.0
MARKER = re.compile(r"#\s*@test:(?P<name>[a-z-]+)\s*$")


def nginx_binary() -> str | None:
    """The machine's nginx (scripts/ensure-nginx.sh installs it), or None."""
    found = shutil.which("nginx")
    if found:
        return found
    for candidate in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def render(listen_port: int, upstreams: Sequence[str], prefix: Path) -> str:
    """deploy/nginx.conf for a test nginx on 127.0.0.1:`listen_port` in front of `upstreams`
    (`host:port`), with its temp files under `prefix`. Every marker must be used."""

    def upstream(line: str) -> str:
        assert UPSTREAM_NAME in line, line
        return "\n".join(line.replace(UPSTREAM_NAME, address) for address in upstreams)

    def temp_paths(line: str) -> str:
        pad = _indent(line)
        return "\n".join(
            f"{pad}{kind}_temp_path {prefix / 'temp' / kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )

    replacements: dict[str, Callable[[str], str]] = {
        "listen": lambda line: f"{_indent(line)}listen 127.0.0.1:{listen_port};",
        "upstream": upstream,
        "temp-paths": temp_paths,
        "upstream-header": lambda line: (
            f"{_indent(line)}add_header X-Upstream-Addr $upstream_addr always;"
        ),
    }
    used: set[str] = set()
    lines = []
    for line in CONFIG.read_text().splitlines():
        match = MARKER.search(line)
        if match is None:
            lines.append(line)
            continue
        name = match["name"]
        assert name in replacements, f"unknown marker @test:{name} in {CONFIG}"
        assert name not in used, f"marker @test:{name} appears twice in {CONFIG}"
        used.add(name)
        lines.append(replacements[name](line[: match.start()].rstrip()))
    assert used == set(replacements), f"markers missing in {CONFIG}: {set(replacements) - used}"
    return "\n".join(lines) + "\n"


class Nginx:
    """An nginx process of the test's own: `nginx -p <dir> -c <dir>/nginx.conf`, its access log
    (the configuration's /dev/stdout) in <dir>/access.log and its error log in <dir>/error.log."""

    def __init__(self, base_dir: Path, upstreams: Sequence[str]) -> None:
        binary = nginx_binary()
        assert binary is not None, "no nginx: run scripts/ensure-nginx.sh"
        self.binary = binary
        self.base_dir = base_dir
        self.port = devtools.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = base_dir / "nginx.conf"
        self.access_log = base_dir / "access.log"
        self.error_log = base_dir / "error.log"
        self.proc: asyncio.subprocess.Process | None = None
        (base_dir / "temp").mkdir(parents=True, exist_ok=True)
        self.config.write_text(render(self.port, upstreams, base_dir))

    def command(self, *extra: str, foreground: bool = False) -> list[str]:
        directives = f"pid {self.base_dir / 'nginx.pid'};"
        if foreground:
            directives += " daemon off;"
        if os.geteuid() == 0:
            # Workers would run as the compiled-in user (nobody on Debian), which cannot
            # reach a private temp directory.
            directives += " user root;"
        return [
            self.binary,
            "-p",
            f"{self.base_dir}/",
            "-c",
            str(self.config),
            "-g",
            directives,
            *extra,
        ]

    def check(self) -> subprocess.CompletedProcess[str]:
        """`nginx -t` on the rendered configuration."""
        return subprocess.run(
            self.command("-t"), capture_output=True, text=True, timeout=STARTUP, check=False
        )

    async def start(self) -> None:
        with self.access_log.open("ab") as out, self.error_log.open("ab") as err:
            self.proc = await asyncio.create_subprocess_exec(
                *self.command(foreground=True),
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
            )
        await self._wait_listening()

    async def _wait_listening(self) -> None:
        async with asyncio.timeout(STARTUP):
            while True:
                assert self.proc is not None
                if self.proc.returncode is not None:
                    raise RuntimeError(f"nginx exited: {self.error_log.read_text()}")
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                except OSError:
                    await asyncio.sleep(0.05)  # nothing to await: the port is polled
                    continue
                writer.close()
                await writer.wait_closed()
                return

    def access_log_text(self) -> str:
        return self.access_log.read_text(errors="replace")

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGQUIT)  # graceful: workers finish, logs are flushed
        try:
            async with asyncio.timeout(STARTUP):
                await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
