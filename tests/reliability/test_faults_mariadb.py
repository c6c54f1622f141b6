"""Faults under load on a MariaDB server of the test's own.

The model is test_faults.py's PostgreSQL test, with its helpers: client
processes insert rows one transaction at a time while the server is
stopped with SIGTERM, then killed with SIGKILL, and started again on the
same data dir and port each time.  After each: the rows the clients
counted as committed are the rows in the table (a commit that failed in
flight is in doubt and may be either), every client commits again
without a restart, and health.changed tells down, then up.
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa

from tests.reliability.clients import LEDGER_DDL
from tests.reliability.conftest import STATS
from tests.reliability.test_faults import (
    _admin,
    _section,
    _settle,
    _transitions,
    _wait_progress,
    _wait_state,
    _writers,
)
from tests.servers import throwaway_mariadb

if TYPE_CHECKING:
    from tests.reliability.conftest import DaemonFactory
    from tests.servers import MariaDBServer

__all__ = ["throwaway_mariadb"]


@pytest.mark.slow
def test_mariadb_stopped_and_killed_loses_no_committed_row(
    throwaway_mariadb: MariaDBServer, start_daemon: DaemonFactory
) -> None:
    """SIGTERM, SIGKILL, restart: counts match, clients recover."""
    server = throwaway_mariadb
    url = server.url()
    engine = _admin(url)
    with engine.begin() as connection:
        connection.execute(sa.text(LEDGER_DDL))
    daemon = start_daemon(_section("maria", url, password=None))
    mark = _wait_state(daemon, "maria", "up", 0)

    try:
        with _writers(daemon, "maria") as writers:
            # A clean stop, then a crash: each down, then up again.
            for fault, status in (("stop", 0), ("sigkill", -signal.SIGKILL)):
                STATS["faults"] += 1
                before = server.port
                ended = server.stop() if fault == "stop" else server.kill()
                assert status == ended, server.log_tail()
                mark = _wait_state(daemon, "maria", "down", mark)
                server.start()
                assert before == server.port
                mark = _wait_state(daemon, "maria", "up", mark)
                _wait_progress(writers, what=f"after the {fault}")
            results = _settle(writers, engine)
    finally:
        engine.dispose()

    assert ["up", "down", "up", "down", "up"] == _transitions(daemon, "maria")
    assert any(result["failures"] for result in results)
