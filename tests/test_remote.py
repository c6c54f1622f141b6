"""Tests for magenta_dynaconn._remote: a registry backed by the daemon.

The daemon is ``tests.test_server.ServerProcess`` (a real subprocess
serving ``DemoService`` over SQLite files); the client runs in this
process, in a forked child and in a spawned one.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import time
import timeit
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session
from structlog.testing import capture_logs

from dynaconnd.errors import (
    ProtocolMismatchError,
    RegistryUnavailableError,
    UnknownDatabaseError,
    UnknownTableError,
)
from dynaconnd.protocol import SERVICE_METHODS
from dynaconnd.server import SocketServer, load_or_create_authkey
from magenta_dynaconn._remote import RemoteRegistry
from tests.helpers import wait_for
from tests.test_server import DemoService, Paths, ServerProcess

if TYPE_CHECKING:
    from collections.abc import Iterator
    from multiprocessing.queues import Queue
    from pathlib import Path


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    """Return the socket, key and data paths of one test's daemon."""
    return {
        "socket": str(tmp_path / "run" / "dynaconnd.sock"),
        "authkey_file": str(tmp_path / "run" / "authkey"),
        "data_dir": str(tmp_path / "data"),
    }


@pytest.fixture
def server(paths: Paths) -> Iterator[ServerProcess]:
    """Yield a daemon serving ``main`` and ``crm``; stop it afterwards."""
    process = ServerProcess(**paths, names=["main", "crm"]).start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def client(server: ServerProcess, paths: Paths) -> Iterator[RemoteRegistry]:
    """Yield a client of ``server``; close it afterwards."""
    registry = RemoteRegistry(paths["socket"], paths["authkey_file"])
    try:
        yield registry
    finally:
        registry.close()


def _calls(server: ServerProcess, method: str) -> int:
    return sum(
        1
        for event in server.named("test.call")
        if event.get("method") == method
    )


def _count(registry: RemoteRegistry, name: str) -> int:
    with registry.session_scope(name) as session:
        return int(session.scalar(sa.text("SELECT count(*) FROM customer")))


def _insert(registry: RemoteRegistry, name: str, who: str) -> None:
    with registry.session_scope(name) as session:
        session.execute(
            sa.text("INSERT INTO customer (name) VALUES (:who)"), {"who": who}
        )


# -- serving -----------------------------------------------------------


def test_client_lists_names_and_queries_without_the_daemon(
    client: RemoteRegistry, server: ServerProcess
) -> None:
    """Names come from the daemon; queries go to the database directly."""
    assert ["main", "crm"] == client.list_names()

    _insert(client, "main", "ada")

    assert 1 == _count(client, "main")
    assert 0 == _count(client, "crm")
    assert 0 == _calls(server, "describe")


def test_hot_path_reads_the_generation_file_not_the_socket(
    client: RemoteRegistry, server: ServerProcess
) -> None:
    """A thousand sessions cost no round trip while nothing changes."""
    client.describe("main")
    wait_for(lambda: _calls(server, "describe") == 1)
    before = len(server.named("test.call"))

    for _ in range(1000):
        client.new_session("main").close()
    client.describe("main")

    wait_for(lambda: _calls(server, "describe") == 2)
    new = server.named("test.call")[before:]
    assert ["describe"] == [event["method"] for event in new]


def test_new_session_costs_about_what_a_bare_session_does(
    client: RemoteRegistry,
) -> None:
    """The generation check adds a few percent to Session(engine)."""
    engine = client.new_session("main").get_bind()
    number = 5_000

    def bare() -> None:
        Session(engine)

    def ours() -> None:
        client.new_session("main")

    bare_s = min(timeit.repeat(bare, number=number, repeat=7)) / number
    ours_s = min(timeit.repeat(ours, number=number, repeat=7)) / number

    print(
        f"Session(engine) {bare_s * 1e6:.2f} us,"
        f" new_session {ours_s * 1e6:.2f} us,"
        f" +{(ours_s / bare_s - 1) * 100:.1f}%"
    )
    # About 5% on a quiet machine; the margin keeps a busy CI green.
    assert ours_s < bare_s * 1.25


def test_a_change_rebuilds_only_the_databases_that_changed(
    client: RemoteRegistry, server: ServerProcess
) -> None:
    """New spec: new engine; same spec: same engine; sessions keep theirs."""
    main_engine = client.new_session("main").get_bind()
    crm_engine = client.new_session("crm").get_bind()
    open_session = client.new_session("crm")
    open_session.execute(sa.text("SELECT 1"))
    generation = client.generation

    server.command("touch crm")

    wait_for(lambda: client.generation > generation)
    assert main_engine is client.new_session("main").get_bind()
    new_crm = client.new_session("crm").get_bind()
    assert crm_engine is not new_crm
    assert open_session.get_bind() is crm_engine
    assert 1 == open_session.scalar(sa.text("SELECT 1"))
    open_session.close()


def test_added_and_removed_databases_follow_the_daemon(
    client: RemoteRegistry, server: ServerProcess
) -> None:
    """A database the daemon adds appears; one it removes is unknown."""
    server.command("add billing")
    wait_for(lambda: "billing" in client.list_names())
    assert 0 == _count(client, "billing")

    server.command("remove crm")
    wait_for(lambda: "crm" not in client.list_names())
    with pytest.raises(UnknownDatabaseError, match="'crm'"):
        client.new_session("crm")


def test_unknown_name_names_close_matches(client: RemoteRegistry) -> None:
    """An unknown name is UnknownDatabaseError, a KeyError, with a hint."""
    with pytest.raises(KeyError):
        client.new_session("mian")
    with pytest.raises(UnknownDatabaseError, match="did you mean main"):
        client.new_session("mian")
    with pytest.raises(UnknownDatabaseError, match="did you mean main"):
        client.describe("mian")


def test_control_calls_return_plain_data(client: RemoteRegistry) -> None:
    """describe, tables, ping, health and the rest answer from the daemon."""
    assert "main" == client.describe("main")["name"]
    assert ["customer"] == client.tables("main")
    assert {"ok": True} == client.ping("main")
    assert {"main", "crm"} == set(client.health())
    assert client.last_outcome()["applied"]
    assert client.reload()["applied"]
    assert {"ok": True, "length": 3} == client.check("abc")


def test_instance_edits_are_visible_to_the_next_session(
    client: RemoteRegistry,
) -> None:
    """add/update/remove return the outcome, and the client sees it at once."""
    client.add_instance("billing", {"source": "sqlite"}, overwrite=False)
    assert "billing" in client.list_names()

    before = client.new_session("billing").get_bind()
    client.update_instance("billing", {"pool_recycle": 1})
    assert before is not client.new_session("billing").get_bind()

    client.remove_instance("billing")
    assert "billing" not in client.list_names()


def test_orm_classes_are_built_here_from_descriptions(
    client: RemoteRegistry, server: ServerProcess
) -> None:
    """get_db_instance maps a table locally; rows round-trip (C12)."""
    customer = client.get_db_instance("main", "customer")

    with client.session_scope("main") as session:
        customer.create(session, name="grace")
    with client.session_scope("main") as session:
        row = customer.read_one(session, name="grace")
        assert row is not None
        values = row.as_dict()

    assert {"id": 1, "name": "grace"} == values
    assert customer is client.get_db_instance("main", "customer")
    with pytest.raises(UnknownTableError):
        client.get_db_instance("main", "nope")


def test_schema_change_gives_new_classes(
    client: RemoteRegistry, server: ServerProcess, paths: Paths
) -> None:
    """A new schema generation replaces the classes of changed tables."""
    old = client.get_db_instance("main", "customer")
    generation = client.generation
    engine = sa.create_engine(
        "sqlite:///" + os.path.join(paths["data_dir"], "main.db")
    )
    with engine.begin() as connection:
        connection.execute(sa.text("ALTER TABLE customer ADD COLUMN email"))
    engine.dispose()

    server.command("schema main")

    new = wait_for(
        lambda: (
            (cls := client.get_db_instance("main", "customer")) is not old
            and cls
        ),
        what="a new class after the schema change",
    )
    assert generation == client.generation
    assert ["id", "name", "email"] == list(new.__table__.c.keys())


def test_rows_cross_a_multiprocessing_queue(client: RemoteRegistry) -> None:
    """What a fetched row gives, as_dict(), goes on a Queue (C12)."""
    customer = client.get_db_instance("main", "customer")
    with client.session_scope("main") as session:
        customer.create(session, name="linus")
    queue: Queue[Any] = multiprocessing.get_context("spawn").Queue()
    try:
        with client.session_scope("main") as session:
            row = customer.read_one(session, name="linus")
            assert row is not None
            queue.put(row.as_dict())
        assert {"id": 1, "name": "linus"} == queue.get(timeout=10)
    finally:
        queue.close()
        queue.join_thread()


# -- the daemon goes away and comes back (C11) ---------------------------


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_client_survives_a_daemon_restart(paths: Paths, how: str) -> None:
    """Cached data keeps serving, calls fail fast, reconnecting is free."""
    first = ServerProcess(**paths, names=["main", "crm"]).start()
    registry = RemoteRegistry(paths["socket"], paths["authkey_file"])
    second: ServerProcess | None = None
    try:
        _insert(registry, "main", "ada")
        with capture_logs() as events:
            getattr(first, how)()

            # What the client knew keeps working.
            _insert(registry, "main", "bob")
            assert 2 == _count(registry, "main")
            assert ["main", "crm"] == registry.list_names()

            # What needs the daemon fails within about two seconds.
            for call in (
                lambda: registry.describe("main"),
                lambda: registry.new_session("billing"),
                registry.reload,
            ):
                started = time.monotonic()
                with pytest.raises(RegistryUnavailableError, match="not"):
                    call()
                assert time.monotonic() - started < 2.5

            # No busy loop: many sessions, few attempts, one event.
            for _ in range(2000):
                registry.new_session("main").close()

            second = ServerProcess(
                **paths, names=["main", "crm", "billing"]
            ).start()
            wait_for(
                lambda: "billing" in registry.list_names(),
                what="the client sees the restarted daemon",
            )
            assert 0 == _count(registry, "billing")
            assert "main" == registry.describe("main")["name"]

        names = [event["event"] for event in events]
        assert 1 == names.count("client.daemon_unavailable")
        assert 1 == names.count("client.reconnected")
        assert [] == [e for e in events if "password" in str(e).lower()]
    finally:
        registry.close()
        first.stop()
        if second is not None:
            second.stop()


def test_a_frozen_daemon_fails_calls_within_the_connect_timeout(
    server: ServerProcess, paths: Paths
) -> None:
    """A daemon that accepts but never answers costs about two seconds."""
    os.kill(server.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(RegistryUnavailableError):
            RemoteRegistry(paths["socket"], paths["authkey_file"])
        assert time.monotonic() - started < 3.5
    finally:
        os.kill(server.pid, signal.SIGCONT)


def test_connecting_without_a_daemon_raises_unavailable(
    paths: Paths,
) -> None:
    """No socket: RegistryUnavailableError at once, naming the socket."""
    load_or_create_authkey(paths["authkey_file"])
    started = time.monotonic()

    with pytest.raises(RegistryUnavailableError, match="dynaconnd at"):
        RemoteRegistry(paths["socket"], paths["authkey_file"])

    assert time.monotonic() - started < 1


def test_protocol_mismatch_is_reported_at_connect(
    paths: Paths,
) -> None:
    """A daemon of another protocol version: an error naming both."""
    process = ServerProcess(**paths, protocol=2).start()
    try:
        with pytest.raises(ProtocolMismatchError) as caught:
            RemoteRegistry(paths["socket"], paths["authkey_file"])
    finally:
        process.stop()

    assert (
        f"client speaks protocol 1, daemon at {paths['socket']} speaks 2"
        == str(caught.value)
    )


def test_wrong_authkey_is_unavailable_not_a_crash(
    server: ServerProcess, paths: Paths, tmp_path: Path
) -> None:
    """A key the daemon rejects is RegistryUnavailableError."""
    wrong = tmp_path / "wrong-key"
    wrong.write_bytes(os.urandom(32))
    wrong.chmod(0o600)

    with pytest.raises(RegistryUnavailableError, match="AuthenticationError"):
        RemoteRegistry(paths["socket"], str(wrong))


def test_polls_when_there_is_no_generation_file(tmp_path: Path) -> None:
    """Without a generation file the client still follows, by polling."""
    socket_path = str(tmp_path / "run" / "dynaconnd.sock")
    key_path = str(tmp_path / "run" / "authkey")
    service = DemoService(str(tmp_path), ["main"])
    server = SocketServer(
        service,
        socket_path=socket_path,
        authkey=load_or_create_authkey(key_path),
        exposed=SERVICE_METHODS,
    )
    server.start()
    registry = RemoteRegistry(socket_path, key_path)
    try:
        service.command("add", "billing")
        wait_for(lambda: "billing" in registry.list_names())
    finally:
        registry.close()
        server.stop()
        service.close()


# -- fork, pickle and spawn ----------------------------------------------


def test_forked_child_opens_its_own_connection(
    client: RemoteRegistry,
) -> None:
    """A child never speaks on the parent's socket or uses its pool."""
    _insert(client, "main", "parent")
    channel = client._channel
    assert channel is not None
    read, write = os.pipe()

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        status = b"ok"
        try:
            if client._channel is not None:
                status = b"inherited the parent's connection"
            else:
                _insert(client, "main", "child")
                client.describe("main")
                if client._channel is None:
                    status = b"no connection of its own"
        except BaseException as error:
            status = repr(error).encode()
        os.write(write, status)
        os._exit(0)

    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        report = pipe.read()
    os.waitpid(pid, 0)

    assert b"ok" == report
    assert channel is client._channel
    assert "main" == client.describe("main")["name"]
    assert 2 == _count(client, "main")


def test_pickled_registry_reconnects_where_it_is_loaded(
    client: RemoteRegistry,
) -> None:
    """Pickling sends the paths, never the key; the copy connects."""
    data = pickle.dumps(client)
    with open(client.authkey_file, "rb") as handle:
        assert handle.read() not in data

    copy = pickle.loads(data)
    try:
        assert client.list_names() == copy.list_names()
        assert copy._channel is not client._channel
    finally:
        copy.close()


def _use_in_spawned_child(registry: RemoteRegistry, queue: Queue[Any]) -> None:
    try:
        customer = registry.get_db_instance("main", "customer")
        with registry.session_scope("main") as session:
            customer.create(session, name="spawned")
        with registry.session_scope("main") as session:
            row = customer.read_one(session, name="spawned")
            queue.put(row.as_dict() if row is not None else None)
    finally:
        registry.close()


def test_registry_passed_to_a_spawned_process(
    client: RemoteRegistry,
) -> None:
    """A spawned process gets a working registry and sends a row back."""
    context = multiprocessing.get_context("spawn")
    queue: Queue[Any] = context.Queue()
    process = context.Process(
        target=_use_in_spawned_child, args=(client, queue)
    )
    process.start()
    try:
        assert {"id": 1, "name": "spawned"} == queue.get(timeout=60)
    finally:
        process.join(timeout=30)
        queue.close()
        queue.join_thread()
    assert 0 == process.exitcode
    assert 1 == _count(client, "main")


def test_closed_registry_refuses_calls(client: RemoteRegistry) -> None:
    """After close() every call says the registry was closed."""
    client.close()

    with pytest.raises(RegistryUnavailableError, match="closed"):
        client.new_session("main")
    with pytest.raises(RegistryUnavailableError, match="closed"):
        client.list_names()
