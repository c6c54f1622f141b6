"""Health and schema jobs of the real daemon, seen by its log and clients."""

from __future__ import annotations

import datetime
import socket
import time
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from dynaconnd.health import DEFAULT_FALL, DEFAULT_RISE, MAX_BACKOFF_FACTOR
from tests.conftest import MYSQL_ADMIN, PG_ADMIN, ini_section
from tests.helpers import wait_for
from tests.proxy import TcpProxy

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

    from tests.daemon_harness import DaemonFactory, DaemonProcess

INTERVAL = 1.0
#: PyMySQL honours fractions of a second; libpq rounds up to 2 s.
MYSQL_TIMEOUT = 0.5
PG_TIMEOUT = 2.0
#: Scheduling on a busy machine: threads wake late, the log is parsed.
SLACK = 1.5


def _timestamp(event: dict[str, Any]) -> float:
    return datetime.datetime.fromisoformat(event["timestamp"]).timestamp()


def _closed_port() -> int:
    """Return a local TCP port that nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _section(name: str, url: URL, **options: str) -> str:
    lines = "".join(f"{key} = {value}\n" for key, value in options.items())
    return ini_section(name, url).replace("\n\n", f"\n{lines}\n")


def _transitions(
    daemon: DaemonProcess, database: str
) -> list[tuple[str, str]]:
    return [
        (event["from"], event["to"])
        for event in daemon.events("health.changed", database=database)
    ]


# -- issue 4: up, down and back up ----------------------------------------


def test_health_reports_up_down_and_recovery_once_per_transition(
    daemons: DaemonFactory, pg_url: URL, mysql_url: URL
) -> None:
    """A live, a refused and a black-holed database; then it comes back."""
    refused = pg_url.set(port=_closed_port())
    with TcpProxy(MYSQL_ADMIN.host or "", MYSQL_ADMIN.port or 0) as proxy:
        proxy.set_mode("blackhole")
        timing = {"health_interval": f"{INTERVAL}s"}
        ini = (
            _section("good", pg_url, **timing)
            + _section("refused", refused, **timing)
            + _section(
                "hole",
                proxy.url(mysql_url),
                health_timeout=f"{MYSQL_TIMEOUT}s",
                **timing,
            )
        )
        daemon = daemons.start(ini=ini)
        registry = daemon.client()
        started = _timestamp(daemon.events("health.synced")[0])

        down = {
            name: daemon.wait_event(
                "health.changed", database=name, to="down", timeout=20
            )
            for name in ("refused", "hole")
        }
        up = daemon.wait_event("health.changed", database="good", to="up")
        reported = registry.health()

        back_at = time.time()
        proxy.set_mode("forward")
        recovered = daemon.wait_event(
            "health.changed", database="hole", to="up", timeout=20
        )
        after = registry.health()

    # A refused connection fails at once: fall probes, interval apart.
    refused_bound = INTERVAL * DEFAULT_FALL + PG_TIMEOUT + SLACK
    # A black hole holds every probe for the whole timeout; probes still
    # start an interval apart (the timeout is shorter than the interval).
    hole_bound = INTERVAL * DEFAULT_FALL + MYSQL_TIMEOUT + SLACK
    # Down, the next probe may wait out a backoff first.
    rise_bound = (
        INTERVAL * DEFAULT_RISE
        + INTERVAL * MAX_BACKOFF_FACTOR
        + MYSQL_TIMEOUT
        + SLACK
    )
    assert _timestamp(down["refused"]) - started < refused_bound
    assert _timestamp(down["hole"]) - started < hole_bound
    assert _timestamp(recovered) - back_at < rise_bound
    assert _timestamp(up) - started < INTERVAL + SLACK

    assert ("up", "down", "down") == tuple(
        reported[name]["state"] for name in ("good", "refused", "hole")
    )
    assert ("OperationalError", "OperationalError") == (
        reported["refused"]["last_error_class"],
        reported["hole"]["last_error_class"],
    )
    assert DEFAULT_FALL == down["hole"]["consecutive_failures"]
    assert ("up", "down", "up") == tuple(
        after[name]["state"] for name in ("good", "refused", "hole")
    )
    assert [("unknown", "up")] == _transitions(daemon, "good")
    assert [("unknown", "down")] == _transitions(daemon, "refused")
    assert [("unknown", "down"), ("down", "up")] == _transitions(
        daemon, "hole"
    )


# -- the schema cache and schema changes ------------------------------------


def test_restarted_daemon_serves_tables_from_its_cache_before_reflecting(
    daemons: DaemonFactory, pg_url: URL
) -> None:
    """Second start, database black-holed: get_db_instance still works."""
    admin = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    with admin.begin() as connection:
        connection.execute(
            sa.text(
                "CREATE TABLE customer (id integer PRIMARY KEY, name text)"
            )
        )
    admin.dispose()
    with TcpProxy(PG_ADMIN.host or "", PG_ADMIN.port or 0) as proxy:
        ini = _section(
            "crm",
            proxy.url(pg_url),
            health_timeout="10s",
            reflect_interval="1s",
        )
        daemon = daemons.start(ini=ini, log_level="debug")
        daemon.wait_event("schema.reflected", database="crm")
        assert 0 == daemon.stop()

        proxy.set_mode("blackhole")
        mark = daemon.mark()
        daemon.start()
        loaded = daemon.wait_event(
            "schema.cache_loaded", after=mark, database="crm"
        )
        registry = daemon.client()
        started = time.monotonic()
        Customer = registry.get_db_instance("crm", "customer")
        took = time.monotonic() - started
        # Nothing was reflected, nor could it be: the host is silent.
        before = [
            event["event"]
            for event in daemon.events(after=mark, database="crm")
            if event["event"].startswith("schema.")
        ]

        proxy.set_mode("forward")
        checked = daemon.wait_event(
            "schema.checked", after=mark, database="crm", timeout=30
        )

    assert (1, 1) == (loaded["tables"], loaded["generation"])
    assert ["id", "name"] == list(Customer.__table__.c.keys())
    assert took < 2.0, took
    assert ["schema.cache_loaded"] == before
    assert [] == daemon.events("schema.reflected", after=mark) + daemon.events(
        "schema.changed", after=mark
    )
    assert "crm" == checked["database"]


def test_added_column_is_logged_and_rebuilds_only_that_class(
    daemons: DaemonFactory, pg_url: URL
) -> None:
    """ALTER TABLE ADD COLUMN: schema.changed, new class, others kept."""
    admin = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    with admin.begin() as connection:
        connection.execute(
            sa.text(
                "CREATE TABLE customer (id integer PRIMARY KEY, name text)"
            )
        )
        connection.execute(
            sa.text("CREATE TABLE product (id integer PRIMARY KEY, sku text)")
        )
    ini = _section("crm", pg_url, reflect_interval="1s")
    daemon = daemons.start(ini=ini)
    reflected = daemon.wait_event("schema.reflected", database="crm")
    registry = daemon.client()
    Customer = registry.get_db_instance("crm", "customer")
    Product = registry.get_db_instance("crm", "product")

    with admin.begin() as connection:
        connection.execute(
            sa.text("ALTER TABLE customer ADD COLUMN email text")
        )
    admin.dispose()
    changed = daemon.wait_event("schema.changed", database="crm", timeout=20)

    def customer_with_email() -> Any:
        cls = registry.get_db_instance("crm", "customer")
        return cls if "email" in cls.__table__.c else None

    NewCustomer = wait_for(
        customer_with_email, what="the client to see the new column"
    )
    with registry.session_scope("crm") as session:
        NewCustomer.create(session, id=1, name="Ada", email="ada@example.org")
    with registry.session_scope("crm") as session:
        row = NewCustomer.get(session, 1).as_dict()

    assert {
        "tables_added": [],
        "tables_removed": [],
        "tables_altered": {
            "customer": {
                "columns_added": ["email"],
                "columns_removed": [],
                "columns_altered": [],
                "altered": [],
            }
        },
        "generation": reflected["generation"] + 1,
    } == {
        key: changed[key]
        for key in (
            "tables_added",
            "tables_removed",
            "tables_altered",
            "generation",
        )
    }
    assert {"id": 1, "name": "Ada", "email": "ada@example.org"} == row
    assert NewCustomer is not Customer
    assert Product is registry.get_db_instance("crm", "product")
