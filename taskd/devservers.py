"""Private Postgres and Redis servers for the dev launcher, the test suite and fault tests."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import pwd
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from urllib.parse import parse_qs, quote, urlsplit

import psycopg2
import psycopg2.errors
import redis
from psycopg2 import sql
from psycopg2.extensions import make_dsn, parse_dsn
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

_LOG_TAIL_LINES = 20
_PG_START_TIMEOUT = 60  # seconds pg_ctl waits for the postmaster to report ready
_PG_STOP_TIMEOUT = 60
_CONNECT_TIMEOUT = 30.0  # seconds to wait for a started server to accept connections
_REDIS_START_TIMEOUT = 15.0
_REDIS_STOP_TIMEOUT = 30.0
_KILL_WAIT = 10.0
_APT_UPDATE_TIMEOUT = 600
_APT_INSTALL_TIMEOUT = 1200
# sun_path is 108 bytes including the NUL terminator.
_MAX_SOCKET_PATH = 107
_PG_STOP_MODES = ("smart", "fast", "immediate")
_PROC = Path("/proc")


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def postgres_reachable(dsn: str, timeout: float = 2.0) -> bool:
    """Return True if the Postgres server named by dsn accepts a connection."""
    # The target database may not exist yet; the server being up is what matters.
    probe = make_dsn(dsn, dbname="postgres", connect_timeout=str(max(1, math.ceil(timeout))))
    try:
        conn = psycopg2.connect(probe)
    except psycopg2.Error as exc:
        log.debug("postgres at %s not reachable: %s", _pg_address(dsn), str(exc).strip())
        return False
    conn.close()
    return True


def redis_reachable(url: str, timeout: float = 2.0) -> bool:
    """Return True if the Redis server named by url answers PING."""
    try:
        # No retries: a probe must answer quickly, and the caller decides what to do next.
        with redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        ) as client:
            return bool(client.ping())
    except (redis.RedisError, OSError) as exc:
        log.debug("redis at %s not reachable: %s", _redis_address(url), exc)
        return False


def ensure_database(dsn: str) -> None:
    """Create the database named in dsn on its server if it does not exist yet."""
    params = parse_dsn(dsn)
    dbname = params.get("dbname")
    if not dbname:
        return
    extra = {} if "connect_timeout" in params else {"connect_timeout": "10"}
    conn = psycopg2.connect(make_dsn(dsn, dbname="postgres", **extra))
    try:
        # CREATE DATABASE cannot run inside a transaction block.
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,))
            if cur.fetchone() is not None:
                return
            try:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
            except psycopg2.errors.DuplicateDatabase:
                # Another process created it between our check and our CREATE.
                return
            log.info("created database %s on %s", dbname, _pg_address(dsn))
    finally:
        conn.close()


def state_dir(project_dir: Path) -> Path:
    """Return (and create) the base directory for private server state of project_dir."""
    project_dir = project_dir.resolve()
    local = project_dir / ".dev"
    if os.geteuid() != 0:
        _make_dirs(local)
        return local
    # As root, postgres runs as nobody, which must be able to reach its data directory.
    nobody_uid = _nobody().pw_uid
    if _traversable_by(local, nobody_uid):
        _make_dirs(local)
        return local
    digest = hashlib.sha1(str(project_dir).encode()).hexdigest()[:12]
    fallback = Path(tempfile.gettempdir()).resolve() / f"taskd-{digest}"
    log.info(
        "%s is not traversable by user nobody; keeping dev server state in %s", local, fallback
    )
    _make_dirs(fallback)
    info = fallback.stat()
    # The temp dir is shared with every user: never adopt a directory someone else planted.
    if info.st_uid != os.geteuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise RuntimeError(
            f"{fallback} exists but is not owned by uid {os.geteuid()} or is group/world "
            "writable; remove it and try again"
        )
    if not _traversable_by(fallback, nobody_uid):
        raise RuntimeError(
            f"neither {local} nor {fallback} is traversable by user nobody; "
            "make their parent directories world-executable (chmod o+x)"
        )
    return fallback


class PostgresServer:
    """A private Postgres cluster in base_dir/pgdata listening on 127.0.0.1:port."""

    def __init__(self, base_dir: Path, port: int | None = None) -> None:
        """Describe the cluster; nothing is created until start()."""
        self.base_dir = Path(base_dir).absolute()
        self.data_dir = self.base_dir / "pgdata"
        self.log_file = self.base_dir / "postgres.log"
        self.port: int = port if port is not None else free_port()

    def dsn(self, dbname: str = "postgres") -> str:
        """Return a libpq URI for dbname on this server."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{quote(dbname, safe='')}"

    def start(self) -> None:
        """Initialise the cluster if needed, start it and wait until it accepts connections."""
        as_nobody = os.geteuid() == 0
        initdb, pg_ctl = _postgres_binaries()
        self._prepare_dirs(as_nobody)
        self._clear_stale_server()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(initdb, as_nobody)

        cmd = [
            str(pg_ctl),
            "start",
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_file),
            "-w",
            "-t",
            str(_PG_START_TIMEOUT),
            "-s",
            "-o",
            shlex.join(self._server_options()),
        ]
        log.info("starting private postgres on 127.0.0.1:%d (data %s)", self.port, self.data_dir)
        try:
            result = _run(
                cmd, cwd=self.base_dir, timeout=_PG_START_TIMEOUT + 30, as_nobody=as_nobody
            )
        except RuntimeError as exc:
            self._abort_start()
            raise self._failure(f"pg_ctl start failed: {exc}") from None
        if result.returncode != 0:
            self._abort_start()
            raise self._failure(f"pg_ctl start exited with {result.returncode}: {result.stdout}")

        deadline = time.monotonic() + _CONNECT_TIMEOUT
        while not postgres_reachable(self.dsn(), timeout=2.0):
            if time.monotonic() > deadline or not self.running():
                self._abort_start()
                raise self._failure("server did not accept connections")
            time.sleep(0.1)

    def stop(self, mode: str = "fast") -> None:
        """Shut the server down with pg_ctl stop -m mode; do nothing if it is not running."""
        if mode not in _PG_STOP_MODES:
            raise ValueError(f"mode must be one of {_PG_STOP_MODES}, not {mode!r}")
        if not self.running():
            return
        _, pg_ctl = _postgres_binaries()
        cmd = [str(pg_ctl), "stop", "-D", str(self.data_dir), "-m", mode, "-w", "-s"]
        cmd += ["-t", str(_PG_STOP_TIMEOUT)]
        try:
            result = _run(
                cmd,
                cwd=self.base_dir,
                timeout=_PG_STOP_TIMEOUT + 30,
                as_nobody=os.geteuid() == 0,
            )
        except RuntimeError as exc:
            raise self._failure(f"pg_ctl stop failed: {exc}") from None
        # A non-zero exit is fine if the server went away anyway (e.g. it died meanwhile).
        if result.returncode != 0 and self.running():
            raise self._failure(f"pg_ctl stop exited with {result.returncode}: {result.stdout}")
        log.info("stopped postgres using %s (%s shutdown)", self.data_dir, mode)

    def kill(self) -> None:
        """SIGKILL the postmaster, as a crash would, and wait until it and its children are gone."""
        pid = self._postmaster_pid()
        if pid is None or not _pid_alive(pid):
            return
        children = _children_of(pid)
        log.info("killing private postgres postmaster %d on 127.0.0.1:%d", pid, self.port)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if not _wait_gone([pid], _KILL_WAIT):
            raise self._failure(f"postmaster {pid} survived SIGKILL")
        # Orphaned backends exit on postmaster death; until they do they pin shared memory
        # and a restart would refuse to run.
        if not _wait_gone(children, _KILL_WAIT):
            for child in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
            _wait_gone(children, _KILL_WAIT)

    def running(self) -> bool:
        """Return True if a postmaster for this data directory is alive."""
        pid = self._postmaster_pid()
        return pid is not None and _pid_alive(pid)

    def _server_options(self) -> list[str]:
        socket_dir = str(self.data_dir)
        if len(f"{socket_dir}/.s.PGSQL.{self.port}") >= _MAX_SOCKET_PATH:
            log.warning("path %s is too long for a unix socket; postgres uses TCP only", socket_dir)
            socket_dir = ""
        options = ["-p", str(self.port)]
        settings = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": socket_dir,
            "max_connections": "200",
            # Dev/test data: no fsync (an OS crash may lose it), but commits still reach the
            # OS before they are acknowledged, so a killed server (fault tests) loses nothing.
            "fsync": "off",
            "full_page_writes": "off",
        }
        for name, value in settings.items():
            options += ["-c", f"{name}={value}"]
        return options

    def _prepare_dirs(self, as_nobody: bool) -> None:
        _make_dirs(self.base_dir)
        if not as_nobody:
            self.data_dir.mkdir(mode=0o700, exist_ok=True)
            return
        nobody = _nobody()
        if not _traversable_by(self.base_dir, nobody.pw_uid):
            raise RuntimeError(
                f"postgres runs as user nobody (we are root) but cannot reach {self.base_dir}: "
                "use a directory whose ancestors are all world-executable (see state_dir())"
            )
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        if self.data_dir.stat().st_uid != nobody.pw_uid:
            _chown_tree(self.data_dir, nobody.pw_uid, nobody.pw_gid)
        self.data_dir.chmod(0o700)
        # The server (as nobody) appends to the log but cannot create files in base_dir.
        self.log_file.touch()
        os.chown(self.log_file, nobody.pw_uid, nobody.pw_gid)

    def _clear_stale_server(self) -> None:
        pid = self._postmaster_pid()
        if pid is None:
            return
        if _pid_alive(pid):
            cmdline = _cmdline(pid)
            if cmdline is None or "postgres" in cmdline:
                log.warning("stopping stale postgres (pid %d) using %s", pid, self.data_dir)
                self.stop("fast")
                if self.running():
                    self.kill()
                return
            log.warning("postmaster.pid names pid %d, now %r; removing it", pid, cmdline)
        elif not _is_zombie(pid):
            # Truly gone: postgres itself checks the lock file and leftover shared memory.
            return
        # A zombie still answers kill(pid, 0), which postgres takes for a live postmaster.
        # Zombies pile up where PID 1 does not reap orphans (some containers and VMs).
        # The socket lock file names the same pid and gets the same check.
        for lock in self.data_dir.glob(".s.PGSQL.*.lock"):
            if _read_pid(lock) == pid:
                lock.unlink(missing_ok=True)
        (self.data_dir / "postmaster.pid").unlink(missing_ok=True)

    def _initdb(self, initdb: Path, as_nobody: bool) -> None:
        base = [str(initdb), "-D", str(self.data_dir), "-A", "trust", "-U", "postgres"]
        base += ["--no-sync", "-E", "UTF8"]
        outputs: list[str] = []
        for locale_args in (["--locale=C.UTF-8"], ["--no-locale"]):
            _empty_dir(self.data_dir)
            log.info("initialising postgres cluster in %s", self.data_dir)
            result = _run(base + locale_args, cwd=self.base_dir, timeout=300, as_nobody=as_nobody)
            if result.returncode == 0:
                return
            outputs.append(result.stdout.strip())
            log.info("initdb %s failed, trying the next locale option", locale_args[0])
        _empty_dir(self.data_dir)
        raise RuntimeError("initdb failed:\n" + "\n---\n".join(outputs))

    def _abort_start(self) -> None:
        # Do not leave a half-started server holding the port and data directory.
        try:
            self.stop("immediate")
        except RuntimeError:
            self.kill()

    def _postmaster_pid(self) -> int | None:
        return _read_pid(self.data_dir / "postmaster.pid")

    def _failure(self, reason: str) -> RuntimeError:
        return RuntimeError(
            f"private postgres on 127.0.0.1:{self.port}: {reason}\n"
            f"--- last {_LOG_TAIL_LINES} lines of {self.log_file} ---\n{_tail(self.log_file)}"
        )


class RedisServer:
    """A private redis-server child process listening on 127.0.0.1:port."""

    def __init__(
        self, base_dir: Path, port: int | None = None, *, persistent: bool = False
    ) -> None:
        """Describe the server; nothing is started until start()."""
        self.base_dir = Path(base_dir).absolute()
        self.log_file = self.base_dir / "redis.log"
        self.pid_file = self.base_dir / "redis.pid"
        self.port: int = port if port is not None else free_port()
        self.persistent = persistent
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Return the redis:// URL of database 0 on this server."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start redis-server and wait until it answers PING."""
        binary = _redis_binary()
        if self.running():
            self.stop()
        _make_dirs(self.base_dir)
        self._clear_stale_server()
        args = [
            str(binary),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.base_dir),
            "--logfile",
            str(self.log_file),
            "--pidfile",
            str(self.pid_file),
            "--daemonize",
            "no",
            "--protected-mode",
            "no",
        ]
        if self.persistent:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--save", "", "--appendonly", "no"]
        log.info("starting private redis on 127.0.0.1:%d (dir %s)", self.port, self.base_dir)
        # Early errors (bad arguments) go to stderr before redis opens its logfile.
        with self.log_file.open("ab") as out:
            # Own session: Ctrl-C in the launcher's terminal must not kill redis before
            # we shut it down cleanly.
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.base_dir,
                start_new_session=True,
            )
        deadline = time.monotonic() + _REDIS_START_TIMEOUT
        while True:
            code = self._proc.poll()
            if code is not None:
                raise self._failure(f"redis-server exited with code {code}")
            if redis_reachable(self.url, timeout=0.5):
                return
            if time.monotonic() > deadline:
                self.kill()
                raise self._failure(f"no answer to PING within {_REDIS_START_TIMEOUT:g} s")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM redis (it saves and fsyncs on the way out) and wait; no-op if not running."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=_REDIS_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.warning("redis on port %d ignored SIGTERM; killing it", self.port)
            proc.kill()
            proc.wait(timeout=_KILL_WAIT)
        log.info("stopped private redis on 127.0.0.1:%d", self.port)

    def kill(self) -> None:
        """SIGKILL redis, as a crash would, and wait until it is gone."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        log.info("killing private redis on 127.0.0.1:%d", self.port)
        proc.kill()
        proc.wait(timeout=_KILL_WAIT)

    def running(self) -> bool:
        """Return True if the redis-server process we started is alive."""
        return self._proc is not None and self._proc.poll() is None

    def _clear_stale_server(self) -> None:
        # A redis left behind by a crashed launcher would write the same AOF as ours.
        pid = _read_pid(self.pid_file)
        if pid is None:
            return
        cmdline = _cmdline(pid)
        if _pid_alive(pid) and cmdline is not None and "redis" in cmdline:
            log.warning("stopping stale redis (pid %d) using %s", pid, self.base_dir)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            if not _wait_gone([pid], _REDIS_STOP_TIMEOUT):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                _wait_gone([pid], _KILL_WAIT)
        self.pid_file.unlink(missing_ok=True)

    def _failure(self, reason: str) -> RuntimeError:
        return RuntimeError(
            f"private redis on 127.0.0.1:{self.port}: {reason}\n"
            f"--- last {_LOG_TAIL_LINES} lines of {self.log_file} ---\n{_tail(self.log_file)}"
        )


class Services:
    """Use the configured Postgres and Redis if reachable, else private ones for the duration."""

    def __init__(self, postgres_dsn: str, redis_url: str, base_dir: Path) -> None:
        """Remember the configured addresses; nothing happens until __enter__."""
        self.postgres_dsn = postgres_dsn
        self.redis_url = redis_url
        self.base_dir = Path(base_dir)
        self.started: list[PostgresServer | RedisServer] = []

    def __enter__(self) -> Services:
        """Pick or start both servers and make sure the configured database exists."""
        try:
            self._setup_postgres()
            self._setup_redis()
        except BaseException:
            # __exit__ is not called when __enter__ raises.
            self._stop_started()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the servers this object started; leave reused ones alone."""
        self._stop_started()

    def _setup_postgres(self) -> None:
        configured = self.postgres_dsn
        if postgres_reachable(configured):
            log.info("postgres: using configured server %s", _pg_address(configured))
        else:
            server = PostgresServer(self.base_dir / "postgres")
            log.info(
                "postgres: configured server %s not reachable; starting a private one",
                _pg_address(configured),
            )
            server.start()
            self.started.append(server)
            dbname = parse_dsn(configured).get("dbname") or "postgres"
            self.postgres_dsn = server.dsn(dbname)
            log.info("postgres: using private server %s", _pg_address(self.postgres_dsn))
        ensure_database(self.postgres_dsn)

    def _setup_redis(self) -> None:
        configured = self.redis_url
        if redis_reachable(configured):
            log.info("redis: using configured server %s", _redis_address(configured))
            return
        server = RedisServer(self.base_dir / "redis")
        log.info(
            "redis: configured server %s not reachable; starting a private one",
            _redis_address(configured),
        )
        server.start()
        self.started.append(server)
        self.redis_url = f"redis://127.0.0.1:{server.port}/{_redis_db(configured)}"
        log.info("redis: using private server %s", _redis_address(self.redis_url))

    def _stop_started(self) -> None:
        # Stop all of them even if one fails, newest first.
        errors: list[Exception] = []
        while self.started:
            server = self.started.pop()
            try:
                server.stop()
            except Exception as exc:
                log.exception("could not stop %s", type(server).__name__)
                errors.append(exc)
        if errors:
            raise errors[0]


def _run(
    cmd: Sequence[str], *, cwd: Path, timeout: float, as_nobody: bool
) -> subprocess.CompletedProcess[str]:
    # postgres tools refuse to run as root; PG* variables from the caller's shell
    # (PGPORT, PGDATA, ...) must not redirect them to another cluster.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    user: int | None = None
    group: int | None = None
    extra_groups: list[int] | None = None
    if as_nobody:
        nobody = _nobody()
        user, group, extra_groups = nobody.pw_uid, nobody.pw_gid, []
    try:
        return subprocess.run(
            list(cmd),
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
            user=user,
            group=group,
            extra_groups=extra_groups,
            start_new_session=True,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{Path(cmd[0]).name} timed out after {timeout:g} s") from None


def _nobody() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        raise RuntimeError(
            "running as root but there is no 'nobody' user to run postgres as"
        ) from None


def _traversable_by(path: Path, uid: int) -> bool:
    # Components that do not exist yet will be created world-executable by _make_dirs.
    for part in (path, *path.parents):
        try:
            info = part.stat()
        except FileNotFoundError:
            continue
        if not (info.st_mode & stat.S_IXOTH or info.st_uid == uid):
            return False
    return True


def _make_dirs(path: Path) -> None:
    # mkdir(parents=True) honours the umask; a 0700 component would lock nobody out.
    missing: list[Path] = []
    for part in (path, *path.parents):
        if part.exists():
            break
        missing.append(part)
    for part in reversed(missing):
        with contextlib.suppress(FileExistsError):
            part.mkdir()
            part.chmod(0o755)


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)


def _empty_dir(path: Path) -> None:
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _read_pid(path: Path) -> int | None:
    try:
        first = path.read_text().split("\n", 1)[0].strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    # The file may be empty or half-written while a server starts.
    return int(first) if first.isdigit() and int(first) > 0 else None


def _proc_stat_fields(pid: int) -> list[str] | None:
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may itself contain spaces or parentheses.
    return text.rpartition(")")[2].split()


def _is_zombie(pid: int) -> bool:
    fields = _proc_stat_fields(pid)
    return fields is not None and fields[0] in ("Z", "X", "x")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if not _PROC.is_dir():
        return True
    fields = _proc_stat_fields(pid)
    # kill(pid, 0) succeeds on zombies; only procfs tells them apart.
    return fields is not None and fields[0] not in ("Z", "X", "x")


def _children_of(pid: int) -> list[int]:
    if not _PROC.is_dir():
        return []
    children = []
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _proc_stat_fields(int(entry.name))
        if fields is not None and len(fields) > 1 and fields[1] == str(pid):
            children.append(int(entry.name))
    return children


def _cmdline(pid: int) -> str | None:
    try:
        raw = (_PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def _wait_gone(pids: Iterable[int], timeout: float) -> bool:
    pending = list(pids)
    deadline = time.monotonic() + timeout
    while True:
        pending = [pid for pid in pending if _pid_alive(pid)]
        if not pending:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as f:
            # Logs of a reused dev directory grow without bound; the end is all we need.
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode(errors="replace")
    except OSError as exc:
        return f"(cannot read log: {exc})"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def _postgres_binaries() -> tuple[Path, Path]:
    found = _find_postgres_binaries()
    if found is None:
        _apt_install("postgresql", "PostgreSQL server binaries (initdb, pg_ctl, postgres)")
        found = _find_postgres_binaries()
        if found is None:
            raise RuntimeError("apt-get installed postgresql but initdb/pg_ctl are still missing")
    return found


def _find_postgres_binaries() -> tuple[Path, Path] | None:
    names = ("initdb", "pg_ctl", "postgres")
    on_path = [shutil.which(name) for name in names]
    if all(on_path):
        return Path(str(on_path[0])), Path(str(on_path[1]))
    # Debian keeps them out of PATH, one directory per major version.
    candidates = []
    for bindir in Path("/usr/lib/postgresql").glob("*/bin"):
        version = bindir.parent.name
        if version.isdigit() and all((bindir / name).is_file() for name in names):
            candidates.append((int(version), bindir))
    if not candidates:
        return None
    bindir = max(candidates)[1]
    return bindir / "initdb", bindir / "pg_ctl"


def _redis_binary() -> Path:
    found = _find_redis_binary()
    if found is None:
        _apt_install("redis-server", "redis-server")
        found = _find_redis_binary()
        if found is None:
            raise RuntimeError("apt-get installed redis-server but the binary is still missing")
    return found


def _find_redis_binary() -> Path | None:
    on_path = shutil.which("redis-server")
    if on_path:
        return Path(on_path)
    for candidate in (Path("/usr/bin/redis-server"), Path("/usr/sbin/redis-server")):
        if candidate.is_file():
            return candidate
    return None


def _apt_install(package: str, what: str) -> None:
    command = f"apt-get update && apt-get install -y {package}"
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        sudo = "" if os.geteuid() == 0 else "sudo "
        raise RuntimeError(
            f"{what} not found; on Debian/Ubuntu install with: "
            f"{sudo}apt-get update && {sudo}apt-get install -y {package}"
        )
    log.warning("%s not found; installing with: %s (this can take a minute)", what, command)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    steps = (
        (["apt-get", "update"], _APT_UPDATE_TIMEOUT),
        (["apt-get", "install", "-y", package], _APT_INSTALL_TIMEOUT),
    )
    for cmd, timeout in steps:
        try:
            result = subprocess.run(
                cmd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{' '.join(cmd)} timed out; run it by hand: {command}") from None
        if result.returncode != 0:
            tail = "\n".join(result.stdout.splitlines()[-_LOG_TAIL_LINES:])
            raise RuntimeError(f"{' '.join(cmd)} failed (run it by hand: {command}):\n{tail}")


def _pg_address(dsn: str) -> str:
    # For logs: never include the password.
    try:
        params = parse_dsn(dsn)
    except psycopg2.Error:
        return "(unparsable dsn)"
    host = params.get("host") or params.get("hostaddr") or "(default socket)"
    return f"{host}:{params.get('port') or 5432}/{params.get('dbname') or '(default db)'}"


def _redis_address(url: str) -> str:
    # For logs: never include the password.
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix:{parts.path} db {_redis_db(url)}"
    try:
        port = parts.port or 6379
    except ValueError:
        return "(unparsable url)"
    return f"{parts.hostname or 'localhost'}:{port}/{_redis_db(url)}"


def _redis_db(url: str) -> int:
    parts = urlsplit(url)
    query_db = parse_qs(parts.query).get("db")
    if query_db and query_db[0].isdigit():
        return int(query_db[0])
    path = parts.path.strip("/")
    if parts.scheme != "unix" and path.isdigit():
        return int(path)
    return 0
