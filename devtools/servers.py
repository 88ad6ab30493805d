"""Private Postgres and Redis processes. mirakuru starts, waits for and stops them; this module
adds what it does not know: Postgres as nobody under root, crashes, stale servers on our files."""

import contextlib
import hashlib
import logging
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, NoReturn
from urllib.parse import quote

import psutil
import psycopg2
import redis
from mirakuru import AlreadyRunning, ExecutorError, TCPExecutor
from mirakuru.exceptions import ProcessFinishedWithError
from psycopg2.extensions import make_dsn
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

_TIMEOUT = 60.0  # to start or stop; crash recovery on a busy machine takes a while
_PG_STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def postgres_reachable(dsn: str, timeout: float = 2.0) -> bool:
    """Return True if the Postgres server named by dsn accepts a connection."""
    # The target database may not exist yet; the server being up is what matters.
    probe = make_dsn(dsn, dbname="postgres", connect_timeout=str(max(1, round(timeout))))
    try:
        psycopg2.connect(probe).close()
    except psycopg2.Error:
        return False
    return True


def redis_reachable(url: str, timeout: float = 2.0) -> bool:
    """Return True if the Redis server named by url answers PING (a loading one does not)."""
    # No retries: a probe answers quickly, and the caller decides what to do next.
    kwargs = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    try:
        with redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), **kwargs) as client:
            return bool(client.ping())
    except (redis.RedisError, OSError):
        return False


def state_dir(project_dir: Path) -> Path:
    """Return (and create) the base directory for private server state of project_dir."""
    local = project_dir.resolve() / ".dev"
    # As root, postgres runs as nobody, which must be able to reach its data directory.
    if os.geteuid() != 0 or _nobody_reaches(local):
        _make_dirs(local)
        return local
    digest = hashlib.sha1(str(local.parent).encode()).hexdigest()[:12]
    fallback = Path(tempfile.gettempdir()).resolve() / f"taskd-{digest}"
    log.info("nobody cannot reach %s; keeping server state in %s", local, fallback)
    _make_dirs(fallback)
    info = fallback.stat()
    # The temp dir is shared with every user: never adopt a directory someone else planted.
    if info.st_uid != 0 or info.st_mode & 0o022 or not _nobody_reaches(fallback):
        raise RuntimeError(f"{fallback} must be root's alone and open to nobody: fix or remove it")
    return fallback


class _Ready(TCPExecutor):
    """Started once `ready()` holds: a port that accepts TCP may still refuse queries."""

    def __init__(self, command: list[str], port: int, ready: Callable[[], bool], **kw: Any) -> None:
        super().__init__(command, "127.0.0.1", port, timeout=_TIMEOUT, **kw)
        self._ready = ready

    def after_start_check(self) -> bool:
        return self._ready()


class _Server:
    """A server process that this object starts on 127.0.0.1:port, its files in base_dir."""

    name: ClassVar[str]  # also the executable's process name

    def __init__(self, base_dir: Path, port: int | None) -> None:
        self.base_dir = Path(base_dir).absolute()
        self.log_file = self.base_dir / f"{self.name}.log"
        self.port: int = port if port is not None else free_port()
        self._proc: _Ready | None = None

    def kill(self) -> None:
        """SIGKILL the server, as a crash would, and wait until it is gone."""
        self._stop(signal.SIGKILL)

    def running(self) -> bool:
        """Return True if the process this object started is alive."""
        return self._proc is not None and self._proc.running()

    def send_signal(self, sig: int) -> None:
        """Send sig (SIGSTOP, SIGCONT, ...) to the process this object started, and to no other."""
        process = self._proc.process if self._proc is not None else None
        if process is None:
            raise RuntimeError(f"private {self.name} on 127.0.0.1:{self.port} is not running")
        process.send_signal(sig)  # a no-op once the process has been reaped: its pid may be reused

    def _stop(self, sig: int) -> None:
        if self._proc is not None:
            with contextlib.suppress(ProcessFinishedWithError):  # exit codes do not matter here
                self._proc.stop(stop_signal=sig)  # waits, SIGKILLs after the timeout, reaps
            self._proc = None
            log.info("stopped private %s on 127.0.0.1:%d (signal %d)", self.name, self.port, sig)

    def _launch(self, command: list[str], ready: Callable[[], bool], **popen: Any) -> None:
        log.info("starting private %s on 127.0.0.1:%d (%s)", self.name, self.port, self.base_dir)
        with self.log_file.open("ab") as out:  # early errors are the server's stdout/stderr
            io = {"stdin": subprocess.DEVNULL, "stdout": out, "stderr": subprocess.STDOUT}
            cwd = str(self.base_dir)
            self._proc = _Ready(command, self.port, ready, cwd=cwd, popen_kwargs=popen, **io)
            try:
                self._proc.start()
            except ExecutorError as exc:
                self._proc = None  # mirakuru killed and reaped it
                reason = "port in use" if isinstance(exc, AlreadyRunning) else str(exc)
                raise self._failure(reason) from None

    def _failure(self, reason: str) -> RuntimeError:
        try:
            with self.log_file.open("rb") as f:  # logs of a reused directory grow without bound
                f.seek(max(0, self.log_file.stat().st_size - 65536))
                tail = "\n".join(f.read().decode(errors="replace").splitlines()[-20:])
        except OSError as exc:
            tail = f"(cannot read it: {exc})"
        return RuntimeError(
            f"private {self.name} on 127.0.0.1:{self.port}: {reason}\n"
            f"--- end of {self.log_file} ---\n{tail}"
        )


class PostgresServer(_Server):
    """A private Postgres cluster in base_dir/pgdata listening on 127.0.0.1:port."""

    name = "postgres"

    def __init__(self, base_dir: Path, port: int | None = None) -> None:
        super().__init__(base_dir, port)
        self.data_dir = self.base_dir / "pgdata"

    def dsn(self, dbname: str = "postgres") -> str:
        """Return a libpq URI for dbname on this server."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{quote(dbname, safe='')}"

    def start(self) -> None:
        """Initialise the cluster if needed, start it and wait until it accepts connections."""
        postgres = _postgres_binary()
        self.stop()
        _make_dirs(self.base_dir)
        _kill_all(self.name, self.data_dir)  # of a killed launcher
        # No server is left on it, so a pid file is stale; a zombie (where PID 1 reaps no
        # orphans) or a reused pid in it would pass for a live postmaster.
        (self.data_dir / "postmaster.pid").unlink(missing_ok=True)
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(postgres.with_name("initdb"))
        # Dev/test data: no fsync (an OS crash may lose it), but commits still reach the OS
        # before they are acknowledged, so a killed server (fault tests) loses nothing. TCP only.
        settings = "listen_addresses=127.0.0.1 unix_socket_directories= max_connections=200"
        settings += " fsync=off full_page_writes=off"
        command = [str(postgres), "-D", str(self.data_dir), "-p", str(self.port)]
        command += [arg for setting in settings.split() for arg in ("-c", setting)]
        self._launch(command, lambda: postgres_reachable(self.dsn(), timeout=1.0), **_as_nobody())

    def stop(self, mode: str = "fast") -> None:
        """Shut our server down in a Postgres shutdown mode; do nothing if it is not running."""
        if mode not in _PG_STOP_SIGNALS:
            raise ValueError(f"mode must be one of {list(_PG_STOP_SIGNALS)}, not {mode!r}")
        self._stop(_PG_STOP_SIGNALS[mode])

    def kill(self) -> None:
        """SIGKILL our postmaster, then its children, as a crash would; wait until all are gone."""
        if self._proc is not None:
            super().kill()  # the postmaster first, so that it starts no new child
            # Backends (own process groups: out of mirakuru's reach) pin shared memory till gone.
            _kill_all(self.name, self.data_dir)

    def _initdb(self, initdb: Path) -> None:
        shutil.rmtree(self.data_dir, ignore_errors=True)  # a half-made one from an earlier try
        self.data_dir.mkdir(mode=0o700)
        if as_nobody := _as_nobody():
            os.chown(self.data_dir, as_nobody["user"], as_nobody["group"])
        command = [str(initdb), f"--pgdata={self.data_dir}", "--auth=trust", "--username=postgres"]
        # C.UTF-8 case-folds all of Unicode; initdb says so if this system lacks the locale.
        command += ["--encoding=UTF8", "--locale=C.UTF-8", "--no-sync"]
        log.info("initialising postgres cluster in %s", self.data_dir)
        result = subprocess.run(
            command, cwd=self.base_dir, capture_output=True, text=True, timeout=300, **as_nobody
        )
        if result.returncode != 0:  # it has emptied the directory
            raise RuntimeError(f"initdb failed:\n{result.stdout}{result.stderr}")


class RedisServer(_Server):
    """A private redis-server child process listening on 127.0.0.1:port."""

    name = "redis-server"

    def __init__(
        self,
        base_dir: Path,
        port: int | None = None,
        *,
        persistent: bool = False,
        args: Sequence[str] = (),
    ) -> None:
        super().__init__(base_dir, port)
        self.persistent = persistent
        self.args = list(args)  # more redis-server options, after (and over) the defaults

    @property
    def url(self) -> str:
        """Return the redis:// URL of database 0 on this server."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start redis-server (append-only, fsync per write if persistent) until it answers."""
        binary = shutil.which(self.name) or _missing("redis-server", "redis-server")
        self.stop()
        _make_dirs(self.base_dir)
        _kill_all(self.name, self.base_dir)  # of a killed launcher: it would use our files
        command = [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", "."]
        persist = ["yes", "--appendfsync", "always"] if self.persistent else ["no", "--save", ""]
        command += ["--daemonize", "no", "--protected-mode", "no", "--appendonly", *persist]
        command += self.args
        self._launch(command, lambda: redis_reachable(self.url, timeout=0.5))

    def stop(self) -> None:
        """SIGTERM redis (it saves and fsyncs on the way out) and wait; no-op if not running."""
        self._stop(signal.SIGTERM)


def _as_nobody() -> dict[str, Any]:
    """Popen arguments that run a child as nobody when we are root (postgres refuses root)."""
    if os.geteuid() != 0:
        return {}
    nobody = pwd.getpwnam("nobody")
    return {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}


def _nobody_reaches(path: Path) -> bool:
    uid = pwd.getpwnam("nobody").pw_uid
    # A missing component will be created world-executable by _make_dirs.
    for part in (path, *path.parents):
        with contextlib.suppress(FileNotFoundError):
            info = part.stat()
            if not (info.st_mode & stat.S_IXOTH or info.st_uid == uid):
                return False
    return True


def _make_dirs(path: Path) -> None:
    # mkdir(parents=True) honours the umask; a 0700 component would lock nobody out.
    for part in reversed([part for part in (path, *path.parents) if not part.exists()]):
        with contextlib.suppress(FileExistsError):
            part.mkdir()
            part.chmod(0o755)


def _kill_all(name: str, directory: Path) -> None:
    """SIGKILL every `name` process working in directory (servers chdir to their data) and wait
    until they are gone or zombies (whose parent, maybe not us, reaps them when it will)."""
    ours = {"name": name, "cwd": str(directory.resolve())}
    procs = [proc for proc in psutil.process_iter(["name", "cwd"]) if proc.info == ours]
    for proc in procs:
        log.info("killing %s process %d, which uses %s", name, proc.pid, directory)
        with contextlib.suppress(psutil.Error):
            proc.kill()
    deadline = time.monotonic() + 10
    while any(_alive(proc) for proc in procs):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} processes using {directory} survived SIGKILL")
        time.sleep(0.02)


def _alive(proc: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    return False


def _postgres_binary() -> Path:
    # Debian keeps the server out of PATH, one directory per major version: the newest wins,
    # and initdb is the one beside the binary that links resolve to.
    versions = [d for d in Path("/usr/lib/postgresql").glob("*/bin") if d.parent.name.isdigit()]
    versions.sort(key=lambda d: -int(d.parent.name))
    path = os.pathsep.join([os.environ.get("PATH", os.defpath), *map(str, versions)])
    found = shutil.which("postgres", path=path)
    return Path(found or _missing("PostgreSQL server (postgres, initdb)", "postgresql")).resolve()


def _missing(what: str, package: str) -> NoReturn:
    hint = f"`sh scripts/ensure-servers.sh` as root, or `sudo apt-get install {package}`"
    raise RuntimeError(f"{what} not found; install it with {hint} (Debian)")
