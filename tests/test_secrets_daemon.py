"""Secrets kept out of source.ini, through a running dynaconnd.

The shared PostgreSQL trusts 127.0.0.1, where any password connects,
so these tests start a throwaway server that checks passwords over TCP
(scram-sha-256) and trusts only its own Unix socket, for the admin.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import URL

from dynaconnd.atomic import atomic_write
from magenta_dynaconn import DatabaseRegistry
from tests.daemon_harness import DaemonProcess, start_dynaconnd
from tests.helpers import wait_for
from tests.servers import postgresql_server

if TYPE_CHECKING:
    from collections.abc import Iterator
    from multiprocessing.synchronize import Event
    from pathlib import Path

__all__ = ["start_dynaconnd"]

pytestmark = pytest.mark.slow

Start = Callable[..., DaemonProcess]

#: Client processes committing during a rotation.
CLIENTS = 4
#: Rows every client commits after the swap before the test stops them.
AFTER_SWAP = 20

_HBA = """\
local all postgres trust
host all all 127.0.0.1/32 scram-sha-256
"""


class Server:
    """A throwaway PostgreSQL that checks passwords on 127.0.0.1."""

    def __init__(self, port: int, socket_dir: str) -> None:
        self.port = port
        self.admin = sa.create_engine(
            URL.create(
                "postgresql+psycopg",
                username="postgres",
                host=socket_dir,
                port=port,
                database="postgres",
            ),
            isolation_level="AUTOCOMMIT",
            poolclass=sa.pool.NullPool,
        )

    def execute(self, statement: str) -> None:
        """Run one administrative statement."""
        with self.admin.connect() as connection:
            connection.execute(sa.text(statement))

    def scalar(self, statement: str, database: str) -> Any:
        """Return one value, read as the superuser in ``database``."""
        engine = sa.create_engine(
            self.admin.url.set(database=database),
            poolclass=sa.pool.NullPool,
        )
        try:
            with engine.connect() as connection:
                return connection.scalar(sa.text(statement))
        finally:
            engine.dispose()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """Start a PostgreSQL that really checks passwords; stop it after."""
    with postgresql_server(hba=_HBA) as executor:
        running = Server(executor.port, executor.unixsocketdir)
        try:
            yield running
        finally:
            running.admin.dispose()


class Role:
    """A login role with a database of its own on the throwaway server."""

    def __init__(self, server: Server, password: str) -> None:
        self.server = server
        self.name = f"dyn_{uuid.uuid4().hex[:10]}"
        self.password = password
        server.execute(f"CREATE ROLE {self.name} LOGIN PASSWORD '{password}'")
        server.execute(f"CREATE DATABASE {self.name} OWNER {self.name}")

    def section(self, name: str, secret: str) -> str:
        """Return a source.ini section for this role, ``secret`` its line."""
        return (
            f"[{name}]\nsource = postgresql\nhost = 127.0.0.1\n"
            f"port = {self.server.port}\nusername = {self.name}\n"
            f"base = {self.name}\n{secret}\nhealth_interval = 1s\n\n"
        )

    def rotate(self, password: str) -> None:
        """Give the role a new password on the server."""
        self.server.execute(f"ALTER ROLE {self.name} PASSWORD '{password}'")
        self.password = password

    def drop(self) -> None:
        """Drop the role's database and the role."""
        self.server.execute(
            f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)"
        )
        self.server.execute(f"DROP ROLE IF EXISTS {self.name}")


@pytest.fixture
def roles(server: Server) -> Iterator[Callable[[str], Role]]:
    """Yield a function that creates roles; drop them all afterwards."""
    made: list[Role] = []

    def make(password: str) -> Role:
        role = Role(server, password)
        made.append(role)
        return role

    try:
        yield make
    finally:
        for role in made:
            role.drop()


def write_secret(path: Path, secret: str) -> None:
    """Write a password file as an operator would: whole, mode 0600."""
    path.parent.mkdir(exist_ok=True, mode=0o700)
    atomic_write(str(path), (secret + "\n").encode(), mode=0o600)


def current_user(client: Any, name: str) -> str:
    """Return who ``name``'s connection logs in as, from the client."""
    with client.session_scope(name) as session:
        return str(session.scalar(sa.text("SELECT current_user")))


def test_every_secret_source_authenticates_through_the_daemon(
    tmp_path: Path, start_dynaconnd: Start, roles: Callable[[str], Role]
) -> None:
    """password_file, ${ENV} and a credential each log a client in."""
    by_file = roles("file-Secret-71x")
    by_env = roles("env-Secret-72y")
    by_credential = roles("cred-Secret-73z")
    secrets_dir = tmp_path / "secrets"
    write_secret(secrets_dir / "crm", by_file.password)
    credentials = tmp_path / "credentials"
    write_secret(credentials / "billing", by_credential.password)

    daemon = start_dynaconnd(
        by_file.section("crm", f"password_file = {secrets_dir / 'crm'}")
        + by_env.section("shop", "password = ${SHOP_PASSWORD}")
        + by_credential.section("billing", "password_credential = billing"),
        env={
            "SHOP_PASSWORD": by_env.password,
            "CREDENTIALS_DIRECTORY": str(credentials),
        },
    )
    client = DatabaseRegistry.connect(daemon.socket, daemon.authkey_file)
    try:
        users = {
            name: current_user(client, name) for name in client.list_names()
        }
        pings = {name: client.ping(name)["ok"] for name in users}
    finally:
        client.close()

    assert {
        "crm": by_file.name,
        "shop": by_env.name,
        "billing": by_credential.name,
    } == users
    assert {"crm": True, "shop": True, "billing": True} == pings
    log = daemon.output()
    for role in (by_file, by_env, by_credential):
        assert role.password not in log


def test_a_wrong_password_is_refused_by_this_server(
    tmp_path: Path, start_dynaconnd: Start, roles: Callable[[str], Role]
) -> None:
    """The throwaway server checks passwords, so a wrong one fails."""
    role = roles("right-Secret-74a")
    write_secret(tmp_path / "secrets" / "crm", "wrong-Secret-75b")

    daemon = start_dynaconnd(
        role.section("crm", f"password_file = {tmp_path / 'secrets' / 'crm'}")
    )
    client = DatabaseRegistry.connect(daemon.socket, daemon.authkey_file)
    try:
        pinged = client.ping("crm")
    finally:
        client.close()

    assert (False, "OperationalError") == (pinged["ok"], pinged["error_class"])
    assert "password authentication failed" in pinged["error"]
    assert "wrong-Secret-75b" not in daemon.output()


def test_a_changed_password_file_reloads_that_database(
    tmp_path: Path, start_dynaconnd: Start, roles: Callable[[str], Role]
) -> None:
    """Saving a referenced password file reloads only its database."""
    role = roles("old-Secret-76c")
    secret = tmp_path / "secrets" / "crm"
    write_secret(secret, role.password)
    (tmp_path / "main.sqlite3").touch()
    daemon = start_dynaconnd(
        role.section("crm", f"password_file = {secret}")
        + f"[main]\nsource = sqlite\nbase = {tmp_path / 'main.sqlite3'}\n"
    )
    seen = daemon.mark()

    role.rotate("new-Secret-77d")
    write_secret(secret, role.password)
    applied = daemon.wait_event("reload.applied", after=seen)
    client = DatabaseRegistry.connect(daemon.socket, daemon.authkey_file)
    try:
        user = current_user(client, "crm")
    finally:
        client.close()

    assert ([], ["crm"], [], 1, 2) == (
        applied["added"],
        applied["changed"],
        applied["removed"],
        applied["unchanged"],
        applied["generation"],
    )
    assert role.name == user
    assert [] == daemon.events("engine.unproven")


# -- rotation under load ---------------------------------------------------


def commit_in_a_loop(
    socket_path: str,
    authkey_file: str,
    number: int,
    stop: Event,
    results: multiprocessing.Queue[Any],
) -> None:
    """Insert one row per transaction until told to stop; report counts."""
    registry = DatabaseRegistry.connect(socket_path, authkey_file)
    committed = 0
    errors: list[str] = []
    passwords: list[str] = []
    try:
        while not stop.is_set():
            try:
                with registry.session_scope("crm") as session:
                    session.execute(
                        sa.text("INSERT INTO ledger (client) VALUES (:n)"),
                        {"n": number},
                    )
                    password = session.get_bind().url.password
            except Exception as error:
                # Keep the first few; the count is what the test checks.
                if len(errors) < 5:
                    errors.append(f"{error.__class__.__name__}: {error}")
                time.sleep(0.01)
                continue
            committed += 1
            if not passwords or passwords[-1] != password:
                passwords.append(str(password))
    finally:
        registry.close()
        results.put((number, committed, errors, passwords))


def test_rotating_a_password_under_load_loses_nothing(
    tmp_path: Path,
    start_dynaconnd: Start,
    roles: Callable[[str], Role],
    server: Server,
) -> None:
    """ALTER ROLE, then the file: clients commit on with no error."""
    role = roles("before-Secret-78e")
    old_password = role.password
    secret = tmp_path / "secrets" / "crm"
    write_secret(secret, role.password)
    daemon = start_dynaconnd(role.section("crm", f"password_file = {secret}"))
    client = DatabaseRegistry.connect(daemon.socket, daemon.authkey_file)
    try:
        with client.session_scope("crm") as session:
            session.execute(
                sa.text(
                    "CREATE TABLE ledger (id serial PRIMARY KEY, client int)"
                )
            )
    finally:
        client.close()

    def rows() -> int:
        return int(server.scalar("SELECT count(*) FROM ledger", role.name))

    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    results: multiprocessing.Queue[Any] = context.Queue()
    workers = [
        context.Process(
            target=commit_in_a_loop,
            args=(daemon.socket, daemon.authkey_file, n, stop, results),
            name=f"committer-{n}",
        )
        for n in range(CLIENTS)
    ]
    reports = []
    try:
        for worker in workers:
            worker.start()
        wait_for(
            lambda: (
                server.scalar(
                    "SELECT count(DISTINCT client) FROM ledger", role.name
                )
                == CLIENTS
            ),
            timeout=30,
            what="every client committing",
        )
        seen = daemon.mark()

        # The order that loses nothing: the server first, then the file.
        role.rotate("after-Secret-79f")
        write_secret(secret, role.password)
        daemon.wait_event("reload.applied", after=seen)
        swapped = rows()
        wait_for(
            lambda: rows() >= swapped + CLIENTS * AFTER_SWAP,
            timeout=30,
            what="commits after the swap",
        )
        stop.set()
        for _ in workers:
            reports.append(results.get(timeout=30))
        for worker in workers:
            worker.join(timeout=30)
    finally:
        stop.set()
        for worker in workers:
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=10)

    assert [[] for _ in range(CLIENTS)] == [report[2] for report in reports]
    assert rows() == sum(report[1] for report in reports)
    assert [[old_password, role.password]] * CLIENTS == [
        report[3] for report in sorted(reports)
    ]
    assert [] == daemon.events("engine.unproven")
    assert [0] * CLIENTS == [worker.exitcode for worker in workers]
    with contextlib.suppress(Exception):
        results.close()
