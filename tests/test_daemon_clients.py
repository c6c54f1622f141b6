"""Clients of the real daemon, here and in processes of their own."""

from __future__ import annotations

import multiprocessing
import uuid
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa

from tests.conftest import PG_ADMIN, ini_section
from tests.daemon_harness import AgentError, DaemonFactory, sqlite_section
from tests.helpers import wait_for

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from sqlalchemy.engine import URL

    from tests.daemon_harness import ClientProcess

#: A call that needs an absent daemon fails within about two seconds.
UNAVAILABLE_BOUND = 5.0
#: How many times C16 flips the user name of crm.
FLIPS = 50


@pytest.fixture
def pg_roles(pg_url: URL) -> Iterator[tuple[str, str]]:
    """Create two login roles with unique names; drop them afterwards."""
    admin = sa.create_engine(
        PG_ADMIN, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool
    )
    stem = f"dyn_role_{uuid.uuid4().hex[:10]}"
    roles = (f"{stem}_a", f"{stem}_b")
    with admin.connect() as connection:
        for role in roles:
            connection.execute(sa.text(f'CREATE ROLE "{role}" LOGIN'))
    try:
        yield roles
    finally:
        with admin.connect() as connection:
            connection.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE usename IN (:a, :b)"
                ),
                {"a": roles[0], "b": roles[1]},
            )
            for role in roles:
                connection.execute(sa.text(f'DROP ROLE IF EXISTS "{role}"'))
        admin.dispose()


def _wait_generation(client: ClientProcess, above: int) -> int:
    """Wait until ``client`` sees a generation above ``above``."""
    reply = client.request("wait_generation", above=above, seconds=10)
    assert reply["ok"], reply
    generation: int = reply["result"]
    return generation


# -- C11: the daemon goes away and comes back ---------------------------------


def test_client_keeps_serving_cached_databases_while_the_daemon_is_down(
    daemons: DaemonFactory, tmp_path: Path
) -> None:
    """Daemon stopped: queries work, daemon calls fail fast, then recover."""
    data = tmp_path / "data"
    base = sqlite_section(data, "main")
    daemon = daemons.start(ini=base)
    client = daemons.client_process(daemon)
    assert ["main"] == client.call("list_names")
    generation = client.call("generation")

    assert 0 == daemon.stop()
    client.sql(
        "main", "INSERT INTO customer (name) VALUES ('down')", commit=True
    )
    rows = client.sql("main", "SELECT name FROM customer")
    failures: list[AgentError] = []
    for method, args in [("reload", ()), ("get_db_instance", ("nope", "t"))]:
        for _ in range(5):
            with pytest.raises(AgentError) as caught:
                client.call(method, *args)
            failures.append(caught.value)
    unavailable = client.log_events("client.daemon_unavailable")

    daemon.save_config(base + sqlite_section(data, "two"))
    daemon.start()
    names = wait_for(
        lambda: client.call("list_names") == ["main", "two"],
        what="the client to see the restarted daemon's registry",
    )
    outcome = client.call("reload")
    mark = daemon.mark()
    daemon.save_config(base)
    daemon.wait_event("reload.applied", after=mark)
    after_save = _wait_generation(client, outcome["generation"])

    assert [["down"]] == rows
    assert {"RegistryUnavailableError"} == {
        failure.error_class for failure in failures
    }
    assert all(failure.elapsed < UNAVAILABLE_BOUND for failure in failures), [
        failure.elapsed for failure in failures
    ]
    assert 1 == len(unavailable), unavailable
    assert (True, 1) == (names, generation)
    assert outcome["generation"] > generation
    assert (True, ["main"]) == (
        after_save > outcome["generation"],
        client.call("list_names"),
    )


def test_client_in_this_process_works_again_after_a_restart(
    daemons: DaemonFactory, tmp_path: Path
) -> None:
    """One registry object serves before, during and after a restart."""
    data = tmp_path / "data"
    base = sqlite_section(data, "main")
    daemon = daemons.start(ini=base)
    registry = daemon.client()
    Customer = registry.get_db_instance("main", "customer")
    before = registry.generation

    daemon.save_config(base + sqlite_section(data, "two"))
    daemon.restart()
    wait_for(
        lambda: "two" in registry.list_names(),
        what="the client to see the new daemon",
    )
    with registry.session_scope("main") as session:
        Customer.create(session, name="again")
    with registry.session_scope("two") as session:
        count = session.execute(sa.text("SELECT count(*) FROM customer"))

        assert 0 == count.scalar()
    outcome = registry.last_outcome()
    # Generations keep rising across a restart: clients never go back.
    assert (["main", "two"], True) == (
        outcome["added"],
        outcome["generation"] > before,
    )
    assert outcome["generation"] == registry.generation


# -- C12: plain data across processes ---------------------------------------


def _rebuild(socket: str, authkey_file: str, inbox: Any, outbox: Any) -> None:
    """In a spawned process: build the class anew, rebuild the row."""
    from magenta_dynaconn import DatabaseRegistry

    values = inbox.get(timeout=30)
    with DatabaseRegistry.connect(socket, authkey_file) as registry:
        Customer = registry.get_db_instance("main", "customer")
        row = Customer(**values)
        outbox.put((type(row).__name__, row.as_dict()))


def test_row_created_through_a_client_crosses_a_queue_as_plain_data(
    daemons: DaemonFactory, tmp_path: Path
) -> None:
    """Create and read a customer; its as_dict() rebuilds it elsewhere."""
    daemon = daemons.start(ini=sqlite_section(tmp_path / "data", "main"))
    registry = daemon.client()
    Customer = registry.get_db_instance("main", "customer")
    with registry.session_scope("main") as session:
        Customer.create(session, name="Ada")
    with registry.session_scope("main") as session:
        row = Customer.read_one(session, name="Ada")
        values = row.as_dict()
    context = multiprocessing.get_context("spawn")
    inbox, outbox = context.Queue(), context.Queue()
    child = context.Process(
        target=_rebuild,
        args=(daemon.socket, daemon.authkey_file, inbox, outbox),
    )
    child.start()
    try:
        inbox.put(values)
        rebuilt = outbox.get(timeout=60)
    finally:
        child.join(timeout=60)
        if child.is_alive():
            child.kill()
            child.join()
        inbox.close()
        outbox.close()
        inbox.join_thread()
        outbox.join_thread()

    assert {"id": 1, "name": "Ada"} == values
    assert ("Customer", values) == rebuilt
    assert 0 == child.exitcode
    description = registry.describe("main")
    assert "main" == description["name"]


# -- fork ------------------------------------------------------------------


def test_forked_client_gets_its_own_connection(
    daemons: DaemonFactory, tmp_path: Path
) -> None:
    """Parent and child of a fork() call the daemon at once, unmixed."""
    daemon = daemons.start(ini=sqlite_section(tmp_path / "data", "main"))
    client = daemons.client_process(daemon)
    client.call("list_names")

    reply = client.request("fork", database="main", calls=200)

    assert reply["ok"], reply
    assert {
        "parent": [[1], 1],
        "child": [[1], 1],
        "child_status": 0,
    } == reply["result"]


# -- C16: one entry redefined many times ------------------------------------


def _crm_ini(base: str, url: URL, user: str) -> str:
    return base + ini_section("crm", url.set(username=user)).replace(
        "\n\n", "\nhealth_interval = 1s\n\n"
    )


def _connections(admin: sa.Engine, database: str) -> int:
    with admin.connect() as connection:
        count = connection.execute(
            sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = :name"
            ),
            {"name": database},
        ).scalar()
    return int(count or 0)


def test_flipping_the_crm_user_fifty_times_always_serves_the_new_user(
    pg_roles: tuple[str, str],
    pg_url: URL,
    daemons: DaemonFactory,
    tmp_path: Path,
) -> None:
    """Fifty user flips: current_user follows, one crm, bounded pool."""
    base = sqlite_section(tmp_path / "data", "main")
    daemon = daemons.start(
        ini=_crm_ini(base, pg_url, pg_roles[0]), args=["--debounce", "20ms"]
    )
    client = daemons.client_process(daemon)
    admin = sa.create_engine(PG_ADMIN, poolclass=sa.pool.NullPool)
    database = pg_url.database or ""
    generation = client.call("generation")
    users: list[str] = []
    expected: list[str] = []
    counts: list[int] = []
    try:
        for flip in range(1, FLIPS + 1):
            user = pg_roles[flip % 2]
            daemon.save_config(_crm_ini(base, pg_url, user))
            generation = _wait_generation(client, generation)
            [[current]] = client.sql("crm", "SELECT current_user")
            users.append(current)
            expected.append(user)
            counts.append(_connections(admin, database))
        names = client.call("list_names")
        settled = wait_for(
            lambda: (
                _connections(admin, database) <= 3
                and _connections(admin, database)
            ),
            what="the replaced engines to be disposed",
        )
    finally:
        admin.dispose()

    assert expected == users
    assert ["main", "crm"] == names
    assert daemon.is_running()
    assert [] == daemon.events("config.rejected")
    assert max(counts) <= 6, counts
    assert settled <= 3


# -- C17: a reload leaves alone what did not change ---------------------------


def test_reload_of_billing_leaves_an_open_crm_transaction_alone(
    pg_url: URL, daemons: DaemonFactory, tmp_path: Path
) -> None:
    """Billing edited, then removed: crm's transaction commits; unknown."""
    admin = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    with admin.begin() as connection:
        connection.execute(
            sa.text("CREATE TABLE note (id serial PRIMARY KEY, body text)")
        )
    data = tmp_path / "data"
    main = sqlite_section(data, "main")
    crm = ini_section("crm", pg_url)
    billing = sqlite_section(data, "billing")
    daemon = daemons.start(ini=main + crm + billing)
    client = daemons.client_process(daemon)
    generation = client.call("generation")

    held_engine = client.request(
        "begin", database="crm", sql="INSERT INTO note (body) VALUES ('kept')"
    )["result"]
    mark = daemon.mark()
    daemon.save_config(
        main + crm + billing.replace("\n\n", "\npool_size = 2\n\n")
    )
    edited = daemon.wait_event("reload.applied", after=mark)
    generation = _wait_generation(client, generation)
    crm_engine = client.request("engine_id", database="crm")["result"]
    committed = client.request("commit")

    mark = daemon.mark()
    daemon.save_config(main + crm)
    removed = daemon.wait_event("reload.applied", after=mark)
    disposed = daemon.wait_event(
        "engine.disposed", after=mark, database="billing"
    )
    _wait_generation(client, generation)
    with pytest.raises(AgentError) as caught:
        client.sql("billing", "SELECT 1")
    with admin.connect() as connection:
        bodies = connection.execute(sa.text("SELECT body FROM note")).all()
    admin.dispose()

    assert ([], ["billing"], [], 2) == (
        edited["added"],
        edited["changed"],
        edited["removed"],
        edited["unchanged"],
    )
    assert (held_engine, True) == (crm_engine, committed["ok"])
    assert [("kept",)] == bodies
    assert (["billing"], False) == (removed["removed"], disposed["forced"])
    assert "UnknownDatabaseError" == caught.value.error_class
    assert "unknown database 'billing'" in str(caught.value)
    assert ["main", "crm"] == client.call("list_names")
