"""Faults under load: databases, the network and the daemon fail.

Client processes (``DatabaseRegistry.connect()``) insert rows one
transaction at a time and count what committed while the test breaks
something: a throwaway PostgreSQL stopped, then killed with SIGKILL; a
TCP proxy in front of MariaDB refusing, resetting and black-holing; the
daemon itself killed with SIGKILL and restarted; the schema cache's
folder unusable, then full.  After each: the rows the clients counted
as committed are the rows in the database (a commit that failed in
flight is in doubt and may be either), every client commits again
without a restart, and the events tell the story.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
from typing import TYPE_CHECKING, Any

import psutil
import pytest
import sqlalchemy as sa

from dynaconnd.errors import RegistryUnavailableError
from tests.helpers import wait_for
from tests.proxy import TcpProxy
from tests.reliability.clients import LEDGER_DDL, Writer
from tests.reliability.conftest import (
    PLANTED,
    STATS,
    DaemonFactory,
    DaemonProcess,
    assert_no_leak,
    replace_file,
    sqlite_section,
)
from tests.servers import superuser_url, throwaway_postgresql

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from sqlalchemy.engine import URL

__all__ = ["throwaway_postgresql"]

WRITERS = 2
RECOVERY_TIMEOUT = 20.0

# Fast health checks, so that down and up take seconds, not minutes.
_FAST = (
    "health_interval = 300ms\nhealth_timeout = 1s\nconnect_timeout = 2s\n"
    "reflect_interval = 500ms\n"
)


def _section(name: str, url: URL, *, password: str | None) -> str:
    lines = [
        f"[{name}]",
        f"source = {url.drivername}",
        f"username = {url.username}",
        f"host = {url.host}",
        f"port = {url.port}",
        f"base = {url.database}",
    ]
    if password is not None:
        # Trust authentication ignores it; it is there to be leaked.
        lines.append(f"password = {password}")
    return "\n".join(lines) + "\n" + _FAST + "\n"


def _admin(url: URL) -> sa.Engine:
    return sa.create_engine(url, poolclass=sa.pool.NullPool)


@contextlib.contextmanager
def _writers(
    daemon: DaemonProcess, database: str, *, watch_name: str = ""
) -> Iterator[list[Writer]]:
    """Run WRITERS client processes; kill any left in the end."""
    writers = [
        Writer(
            daemon.folder,
            socket=daemon.socket,
            authkey_file=daemon.authkey_file,
            database=database,
            worker=worker,
            watch_name=watch_name,
        ).start()
        for worker in range(WRITERS)
    ]
    try:
        _wait_progress(writers, what="the first commits")
        yield writers
    finally:
        for writer in writers:
            writer.kill()
            if writer.log.exists():
                assert_no_leak(
                    f"client log {writer.worker}", writer.log.read_bytes()
                )


def _wait_progress(writers: list[Writer], *, what: str) -> None:
    """Wait until every writer has committed again, from now on."""
    before = {writer.worker: writer.committed for writer in writers}
    wait_for(
        lambda: all(w.committed > before[w.worker] for w in writers),
        timeout=RECOVERY_TIMEOUT,
        what=f"every client to commit: {what}",
    )


def _settle(writers: list[Writer], engine: sa.Engine) -> list[dict[str, Any]]:
    """Stop the writers; check their counts against the table."""
    results = [writer.finish() for writer in writers]
    with engine.connect() as connection:
        rows = {
            (worker, seq)
            for worker, seq in connection.execute(
                sa.text("SELECT worker, seq FROM ledger")
            )
        }
    committed = {
        (result["worker"], seq)
        for result in results
        for seq in result["committed"]
    }
    in_doubt = {
        (result["worker"], seq)
        for result in results
        for seq in result["in_doubt"]
    }
    STATS["rows"] += len(rows)

    # Every commit the clients counted is there, and nothing else but
    # commits whose answer was lost.
    assert set() == committed - rows
    assert set() == rows - committed - in_doubt
    assert all(result["committed"] for result in results)
    return results


def _transitions(daemon: DaemonProcess, name: str) -> list[str]:
    """Return the states ``name`` went through, counting slow as up.

    A probe over the slow threshold on a loaded test machine is not part
    of the story told here: reachable or not.
    """
    states: list[str] = []
    for event in daemon.named("health.changed"):
        state = "up" if event["to"] == "slow" else event["to"]
        if event["database"] == name and state not in states[-1:]:
            states.append(state)
    return states


def _wait_state(
    daemon: DaemonProcess, name: str, state: str, after: int
) -> int:
    """Wait for ``name`` to reach ``state`` (slow counts as up)."""
    wanted = {"up", "slow"} if state == "up" else {state}
    index, _ = daemon.wait_event(
        "health.changed",
        after=after,
        where=lambda e: e["database"] == name and e["to"] in wanted,
        timeout=RECOVERY_TIMEOUT,
    )
    return index + 1


# -- a PostgreSQL server of our own -------------------------------------


def _kill_postgresql(server: Any) -> None:
    """SIGKILL the postmaster and all its children, as a crash would."""
    with open(os.path.join(server.datadir, "postmaster.pid")) as handle:
        postmaster = psutil.Process(int(handle.readline()))
    victims = [postmaster, *postmaster.children(recursive=True)]
    for victim in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            victim.send_signal(signal.SIGKILL)
    psutil.wait_procs(victims, timeout=10)
    # mirakuru still holds the launcher of the dead server; forget it so
    # that start() launches a new one.
    server.process = None


@pytest.mark.slow
def test_postgresql_stopped_and_killed_loses_no_committed_row(
    throwaway_postgresql: Any, start_daemon: DaemonFactory
) -> None:
    """Stop, SIGKILL and restart the server; counts match, clients recover."""
    server = throwaway_postgresql
    url = superuser_url(server)
    engine = _admin(url)
    with engine.begin() as connection:
        connection.execute(sa.text(LEDGER_DDL))
    daemon = start_daemon(_section("pg", url, password=PLANTED))
    mark = _wait_state(daemon, "pg", "up", 0)

    try:
        with _writers(daemon, "pg") as writers:
            # A clean stop, then a crash: each down, then up again.
            for fault in ("stop", "sigkill"):
                STATS["faults"] += 1
                if fault == "stop":
                    server.stop()
                else:
                    _kill_postgresql(server)
                mark = _wait_state(daemon, "pg", "down", mark)
                server.start()
                mark = _wait_state(daemon, "pg", "up", mark)
                _wait_progress(writers, what=f"after the {fault}")
            results = _settle(writers, engine)
    finally:
        engine.dispose()

    assert ["up", "down", "up", "down", "up"] == _transitions(daemon, "pg")
    assert any(result["failures"] for result in results)


# -- a TCP proxy in front of MariaDB ------------------------------------


@pytest.mark.mysql
def test_proxy_faults_in_front_of_mariadb_lose_no_committed_row(
    mysql_url: URL, start_daemon: DaemonFactory
) -> None:
    """Refused, reset and black-holed connections: down, up, counts match."""
    engine = _admin(mysql_url)
    with engine.begin() as connection:
        connection.execute(sa.text(LEDGER_DDL))
    try:
        with TcpProxy(mysql_url.host or "", mysql_url.port or 3306) as proxy:
            daemon = start_daemon(
                _section("maria", proxy.url(mysql_url), password=None)
            )
            mark = _wait_state(daemon, "maria", "up", 0)
            with _writers(daemon, "maria") as writers:
                for mode in ("refuse", "reset", "blackhole"):
                    STATS["faults"] += 1
                    proxy.set_mode(mode)
                    mark = _wait_state(daemon, "maria", "down", mark)
                    proxy.set_mode("forward")
                    mark = _wait_state(daemon, "maria", "up", mark)
                    _wait_progress(writers, what=f"after {mode}")
                _settle(writers, engine)
    finally:
        engine.dispose()

    expected = ["up", "down", "up", "down", "up", "down", "up"]
    assert expected == _transitions(daemon, "maria")


# -- the daemon itself --------------------------------------------------


@pytest.mark.postgresql
def test_daemon_killed_clients_keep_working_and_reattach(
    pg_url: URL, start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    """SIGKILL the daemon: writes go on; after a restart clients see edits."""
    engine = _admin(pg_url)
    with engine.begin() as connection:
        connection.execute(sa.text(LEDGER_DDL))
    ini = _section("pg", pg_url, password=PLANTED)
    daemon = start_daemon(ini)
    probe = daemon.connect()
    assert ["pg"] == probe.list_names()

    try:
        with _writers(daemon, "pg", watch_name="extra") as writers:
            STATS["faults"] += 1
            assert -signal.SIGKILL == daemon.kill(signal.SIGKILL)

            # The data plane needs no daemon; the control plane fails fast.
            _wait_progress(writers, what="while the daemon is dead")
            with pytest.raises(RegistryUnavailableError) as caught:
                probe.health()
            assert_no_leak("unavailable error", str(caught.value))

            daemon.start()
            replace_file(
                daemon.config, ini + sqlite_section(daemon.folder, "extra")
            )
            daemon.wait_event(
                "reload.applied", where=lambda e: e["added"] == ["extra"]
            )
            wait_for(
                lambda: all(writer.seen.value for writer in writers),
                timeout=RECOVERY_TIMEOUT,
                what="every client to see the new section",
            )
            _wait_progress(writers, what="after the restart")
            _settle(writers, engine)
    finally:
        engine.dispose()

    assert 1 == len(daemon.named("server.stale_socket_removed"))
    assert ["pg", "extra"] == probe.list_names()


# -- the schema cache's folder ------------------------------------------


def _mount_tmpfs(folder: Path) -> bool:
    """Mount a 256 KiB tmpfs on ``folder``; False where that is not allowed."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    result = subprocess.run(
        [
            "mount",
            "-t",
            "tmpfs",
            "-o",
            "size=256k,mode=0700",
            "tmpfs",
            str(folder),
        ],
        capture_output=True,
        check=False,
    )
    return 0 == result.returncode


def _fill(folder: Path) -> None:
    """Write a file in ``folder`` until the file system is full."""
    with pytest.raises(OSError, match="No space left") as caught:
        _write_forever(folder / "filler")
    assert errno.ENOSPC == caught.value.errno


def _write_forever(path: Path) -> None:
    """Append zeros to ``path`` until writing fails."""
    with open(path, "wb") as handle:
        while True:
            handle.write(b"\0" * 4096)
            handle.flush()
            os.fsync(handle.fileno())


def _cached_tables(folder: Path) -> set[str]:
    tables: set[str] = set()
    for path in folder.glob("*.json"):
        with contextlib.suppress(ValueError, OSError):
            tables |= set(json.loads(path.read_text())["tables"])
    return tables


@pytest.mark.postgresql
def test_schema_cache_degrades_when_its_folder_is_unusable_or_full(
    pg_url: URL, start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    """No schemas folder, then a full one: warnings, clients unharmed."""
    engine = _admin(pg_url)
    with engine.begin() as connection:
        connection.execute(sa.text(LEDGER_DDL))
    state = tmp_path / "state"
    state.mkdir()
    schemas = state / "schemas"
    schemas.write_text("a file where the cache folder should be\n")
    daemon = start_daemon(
        _section("pg", pg_url, password=PLANTED), state_dir=state
    )
    mounted = False

    def create(table: str) -> int:
        mark = daemon.mark()
        with engine.begin() as connection:
            connection.execute(
                sa.text(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY)")
            )
        _index, _ = daemon.wait_event(
            "schema.changed",
            after=mark,
            where=lambda e: table in json.dumps(e),
            timeout=RECOVERY_TIMEOUT,
        )
        return mark

    try:
        with _writers(daemon, "pg") as writers:
            # The cache folder cannot be made: one warning, still served.
            STATS["faults"] += 1
            (unwritable,) = [daemon.wait_event("schema.cache_unwritable")[1]]
            assert "pg" == unwritable["database"]
            client = daemon.connect()
            assert (
                "ledger"
                == client.get_db_instance("pg", "ledger").__table__.name
            )

            schemas.unlink()
            schemas.mkdir()
            mounted = _mount_tmpfs(schemas)
            if mounted:
                # Room again: the next change is cached.
                create("t_room")
                wait_for(
                    lambda: "t_room" in _cached_tables(schemas),
                    what="the cache file",
                )

                # Full: one more warning, and the old cache file stays.
                STATS["faults"] += 1
                _fill(schemas)
                mark = create("t_full")
                _, full = daemon.wait_event(
                    "schema.cache_unwritable", after=mark
                )
                assert "pg" == full["database"]
                assert "t_full" not in _cached_tables(schemas)

                # Room once more: cached again.
                (schemas / "filler").unlink()
                create("t_again")
                wait_for(
                    lambda: {"t_full", "t_again"} <= _cached_tables(schemas),
                    what="the cache file after space came back",
                )
            _wait_progress(writers, what="after the cache faults")
            _settle(writers, engine)
            assert "t_again" == (
                client.get_db_instance("pg", "t_again").__table__.name
                if mounted
                else "t_again"
            )
    finally:
        engine.dispose()
        daemon.stop()
        if mounted:
            subprocess.run(["umount", "-l", str(schemas)], check=False)

    expected = 2 if mounted else 1
    assert expected == len(daemon.named("schema.cache_unwritable"))
    if not mounted:
        pytest.skip("tmpfs cannot be mounted here: the full case was not run")
