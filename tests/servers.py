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
import socket
import tempfile
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy.engine import URL

from tests.conftest import IN_CI

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = [
    "free_port",
    "postgresql_server",
    "superuser_url",
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
