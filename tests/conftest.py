"""Shared fixtures: real databases on SQLite, PostgreSQL and MariaDB.

Each test that needs a server database gets a fresh one with a unique
name on the shared server and drops it afterwards.  With ``CI=true`` a
missing server fails the test; elsewhere the test is skipped.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa
import structlog
from sqlalchemy.engine import URL

from dynaconnd.editing import render_section, url_values
from tests.daemon_harness import DaemonFactory

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

# Tests assert on every event, debug included; configuring structlog
# here also keeps the client library's quiet defaults out of the way.
structlog.configure(
    wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG)
)

PG_ADMIN = URL.create(
    "postgresql+psycopg",
    username="postgres",
    host="127.0.0.1",
    port=5432,
    database="postgres",
)
MYSQL_ADMIN = URL.create(
    "mysql+pymysql", username="root", host="127.0.0.1", port=3306
)
BACKENDS = ("sqlite", "postgresql", "mysql")


def _server_or_skip(admin: URL, what: str) -> sa.Engine:
    engine = sa.create_engine(
        admin,
        isolation_level="AUTOCOMMIT",
        poolclass=sa.pool.NullPool,
    )
    try:
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as error:
        engine.dispose()
        reason = f"{what} is not reachable at {admin.host}:{admin.port}"
        if IN_CI:
            pytest.fail(f"{reason} and CI=true: {error.__class__.__name__}")
        pytest.skip(reason)
    return engine


def unique_name(prefix: str = "dyn") -> str:
    """Return a database name no other test run uses."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def pg_url() -> Iterator[URL]:
    """Create an empty PostgreSQL database and yield its URL."""
    admin = _server_or_skip(PG_ADMIN, "PostgreSQL")
    name = unique_name()
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN.set(database=name)
    finally:
        with admin.connect() as connection:
            connection.execute(
                sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            )
        admin.dispose()


@pytest.fixture
def mysql_url() -> Iterator[URL]:
    """Create an empty MariaDB database and yield its URL."""
    admin = _server_or_skip(MYSQL_ADMIN, "MariaDB")
    name = unique_name()
    with admin.connect() as connection:
        connection.execute(sa.text(f"CREATE DATABASE `{name}`"))
    try:
        yield MYSQL_ADMIN.set(database=name)
    finally:
        with admin.connect() as connection:
            connection.execute(sa.text(f"DROP DATABASE IF EXISTS `{name}`"))
        admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> URL:
    """Return the URL of a SQLite file in the test's own folder."""
    return URL.create("sqlite", database=str(tmp_path / "test.db"))


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest) -> URL:
    """Yield an empty database on each backend in turn."""
    fixture = {"sqlite": "sqlite_url", "postgresql": "pg_url"}.get(
        request.param, "mysql_url"
    )
    url: URL = request.getfixturevalue(fixture)
    return url


def ini_section(name: str, url: URL, **extra: str | int | None) -> str:
    """Render a source.ini section that points at ``url``."""
    return render_section(name, {**url_values(url), **extra}) + "\n"


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    """Fail any test that leaves a non-daemon thread of ours running."""
    before = set(threading.enumerate())
    yield
    leaked = [
        thread
        for thread in threading.enumerate()
        if thread not in before
        and thread.is_alive()
        and thread.name.startswith("dynaconn")
    ]
    for thread in leaked:
        thread.join(timeout=5)
    still = [thread.name for thread in leaked if thread.is_alive()]
    assert [] == still, f"threads leaked by the test: {still}"


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[DaemonFactory]:
    """Start daemons under ``tmp_path``; close them after the test."""
    with DaemonFactory(tmp_path) as factory:
        yield factory
