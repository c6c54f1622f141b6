"""Database servers a test owns, to stop, kill or configure as it likes.

The shared servers behind ``pg_url`` and ``mysql_url`` are never stopped
by a test (see DEVELOPERS.md).  A test that needs a server to go away,
or one configured unlike the shared one, starts its own here::

    def test_x(throwaway_postgresql: Any) -> None:
        server = throwaway_postgresql      # a PostgreSQLExecutor
        server.stop()
        server.start()

``postgresql_server(hba=...)`` is the same server as a context manager,
for fixtures of a wider scope or with password authentication.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy.engine import URL

from tests.conftest import IN_CI

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = [
    "MariaDBServer",
    "free_port",
    "mariadb_server",
    "postgresql_server",
    "superuser_url",
    "throwaway_mariadb",
    "throwaway_postgresql",
]


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on just now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@contextlib.contextmanager
def postgresql_server(*, hba: str | None = None) -> Iterator[Any]:
    """Start a PostgreSQL server of the caller's own; yield its executor.

    The server is pytest-postgresql's ``PostgreSQLExecutor`` (``port``,
    ``unixsocketdir``, ``stop()``, ``start()``) on 127.0.0.1 and a Unix
    socket, with the superuser ``postgres``.  ``hba`` replaces its
    pg_hba.conf: pass rules that check passwords to test them.  The
    test is skipped without pg_ctl (it fails under ``CI=true``).
    """
    executors = pytest.importorskip("pytest_postgresql.executors")
    pg_ctl = shutil.which("pg_ctl")
    runuser = shutil.which("runuser")
    if pg_ctl is None or (os.geteuid() == 0 and runuser is None):
        reason = "pg_ctl (and runuser, as root) are needed"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)

    # PostgreSQL refuses to run as root, and pytest's folders are root's
    # alone: as root, run pg_ctl as postgres in a /tmp folder it owns.
    home = tempfile.mkdtemp(prefix="dynaconn-pg-")
    executable = pg_ctl
    if os.geteuid() == 0:
        shutil.chown(home, user="postgres")
        executable = os.path.join(home, "pg_ctl")
        with open(executable, "w") as wrapper:
            wrapper.write(
                f'#!/bin/sh\nexec {runuser} -u postgres -- {pg_ctl} "$@"\n'
            )
        os.chmod(executable, 0o755)
    options = ""
    if hba is not None:
        hba_file = os.path.join(home, "pg_hba.conf")
        with open(hba_file, "w") as handle:
            handle.write(hba)
        # The server, running as postgres, reads it: world-readable.
        os.chmod(hba_file, 0o644)
        options = f"-c hba_file={hba_file}"
    server = executors.PostgreSQLExecutor(
        executable=executable,
        host="127.0.0.1",
        port=free_port(),
        datadir=os.path.join(home, "data"),
        unixsocketdir=home,
        logfile=os.path.join(home, "server.log"),
        startparams="-w",
        dbname="postgres",
        user="postgres",
        postgres_options=options,
    )
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(home, ignore_errors=True)


def superuser_url(server: Any) -> URL:
    """Return the URL of ``server``'s database postgres, over TCP."""
    return URL.create(
        "postgresql+psycopg",
        username="postgres",
        host="127.0.0.1",
        port=server.port,
        database="postgres",
    )


@pytest.fixture
def throwaway_postgresql() -> Iterator[Any]:
    """Start a PostgreSQL server of the test's own; yield its executor."""
    with postgresql_server() as server:
        yield server


# -- MariaDB ---------------------------------------------------------------

#: How long a MariaDB server may take to initialise or to accept queries.
MARIADB_TIMEOUT = 60.0


class MariaDBServer:
    """A MariaDB server of a test's own: ``mariadbd`` on a data dir.

    It listens on 127.0.0.1:``port`` and on ``socket``; root has an
    empty password, over TCP too.  ``stop()`` sends SIGTERM and waits,
    ``kill()`` sends SIGKILL, as a crash would; ``start()`` starts it
    again on the same data dir and port.  ``database`` is created on
    the first start.
    """

    def __init__(
        self, home: str, *, mariadbd: str, database: str = "dynaconn"
    ) -> None:
        self.home = home
        self.mariadbd = mariadbd
        self.database = database
        self.datadir = os.path.join(home, "data")
        self.socket = os.path.join(home, "mysql.sock")
        self.logfile = os.path.join(home, "server.log")
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def initialise(self, install_db: str) -> None:
        """Create the data dir with ``mariadb-install-db``."""
        with open(os.path.join(self.home, "install.log"), "wb") as log:
            subprocess.run(
                [
                    install_db,
                    "--no-defaults",
                    f"--datadir={self.datadir}",
                    "--user=root",
                    "--auth-root-authentication-method=normal",
                    "--skip-test-db",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                check=True,
                timeout=MARIADB_TIMEOUT,
            )

    def url(self, database: str | None = None) -> URL:
        """Return root's URL of ``database`` (by default ours), over TCP."""
        return URL.create(
            "mysql+pymysql",
            username="root",
            host="127.0.0.1",
            port=self.port,
            database=self.database if database is None else database,
        )

    def running(self) -> bool:
        """Return whether the server process is alive."""
        return self.process is not None and self.process.poll() is None

    def start(self) -> MariaDBServer:
        """Start the server; return once it answers ``SELECT 1``."""
        assert not self.running(), "the server is already running"
        with open(self.logfile, "ab") as log:
            self.process = subprocess.Popen(
                [
                    self.mariadbd,
                    "--no-defaults",
                    f"--datadir={self.datadir}",
                    f"--port={self.port}",
                    f"--socket={self.socket}",
                    "--bind-address=127.0.0.1",
                    "--user=root",
                    f"--pid-file={os.path.join(self.home, 'mariadbd.pid')}",
                    "--skip-name-resolve",
                    "--skip-log-bin",
                    "--innodb-buffer-pool-size=32M",
                    "--innodb-log-file-size=16M",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        pymysql = pytest.importorskip("pymysql")
        deadline = time.monotonic() + MARIADB_TIMEOUT
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"mariadbd exited with status {self.process.returncode}:"
                    f"\n{self.log_tail()}"
                )
            try:
                connection = pymysql.connect(
                    host="127.0.0.1",
                    port=self.port,
                    user="root",
                    connect_timeout=2,
                )
            except pymysql.err.OperationalError:
                if time.monotonic() > deadline:
                    self.kill()
                    raise TimeoutError(
                        f"mariadbd did not accept queries within"
                        f" {MARIADB_TIMEOUT:.0f} s:\n{self.log_tail()}"
                    ) from None
                time.sleep(0.1)
                continue
            with contextlib.closing(connection):
                with connection.cursor() as cursor:
                    cursor.execute("SELECT 1")
                    cursor.execute(
                        f"CREATE DATABASE IF NOT EXISTS `{self.database}`"
                    )
                connection.commit()
            return

    def stop(self, timeout: float = MARIADB_TIMEOUT) -> int | None:
        """Stop the server with SIGTERM; wait; return its exit status."""
        return self._end(signal.SIGTERM, timeout)

    def kill(self, timeout: float = 10.0) -> int | None:
        """Kill the server with SIGKILL, as a crash would; wait."""
        return self._end(signal.SIGKILL, timeout)

    def _end(self, signum: int, timeout: float) -> int | None:
        process, self.process = self.process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signum)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        return process.returncode

    def log_tail(self, lines: int = 30) -> str:
        """Return the end of the server's log."""
        try:
            with open(self.logfile, errors="replace") as handle:
                return "".join(handle.readlines()[-lines:])
        except OSError:
            return ""


@contextlib.contextmanager
def mariadb_server(*, database: str = "dynaconn") -> Iterator[MariaDBServer]:
    """Start a MariaDB server of the caller's own; yield it.

    The test is skipped without mariadbd and mariadb-install-db (it
    fails under ``CI=true``).
    """
    mariadbd = shutil.which("mariadbd") or shutil.which(
        "mariadbd", path="/usr/sbin:/usr/local/sbin"
    )
    install_db = shutil.which("mariadb-install-db") or shutil.which(
        "mysql_install_db"
    )
    if mariadbd is None or install_db is None:
        reason = "mariadbd and mariadb-install-db are needed"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)

    home = tempfile.mkdtemp(prefix="dynaconn-maria-")
    server = MariaDBServer(home, mariadbd=mariadbd, database=database)
    try:
        server.initialise(install_db)
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def throwaway_mariadb() -> Iterator[MariaDBServer]:
    """Start a MariaDB server of the test's own; yield it."""
    with mariadb_server() as server:
        yield server
