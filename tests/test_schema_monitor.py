"""Specifications of the schema monitor: jobs, changes, the disk cache.

Databases are real (SQLite, PostgreSQL, MariaDB); a reflection is
slowed by an engine event that waits on a gate, and a host is made to
hang with the TCP proxy the tests own.
"""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from structlog.testing import capture_logs

from dynaconnd import schema
from dynaconnd.errors import UnknownDatabaseError, UnknownTableError
from dynaconnd.scheduling import make_scheduler
from dynaconnd.schema_monitor import (
    CACHE_FILE_MODE,
    CACHE_FORMAT_VERSION,
    SchemaMonitor,
    build_reflection_engine,
    cache_file_name,
)
from dynaconnd.spec import DatabaseSpec, ReflectionScope, Schedule
from tests.helpers import wait_for
from tests.proxy import TcpProxy

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping, Sequence
    from pathlib import Path

    from apscheduler.schedulers.base import BaseScheduler
    from sqlalchemy.engine import URL

PLANTED = "pl4nted-s3cret"
INTERVAL = 0.3
LONG = 60.0
# Time for one check of a server database on a loaded machine.
SLACK = 2.0


def spec(
    name: str,
    url: URL,
    *,
    interval: float = INTERVAL,
    health_timeout: float = 2.0,
) -> DatabaseSpec:
    """Return a spec reflected every ``interval`` seconds."""
    return DatabaseSpec(
        name=name,
        url=url,
        schedule=Schedule(
            reflect_interval=interval, health_timeout=health_timeout
        ),
    )


class Counted:
    """Build reflection engines that count their checks, maybe gated.

    ``per_check`` holds the statements each finished connection ran;
    each check of the monitor is one connection.
    """

    def __init__(self, *, gate: threading.Event | None = None) -> None:
        self.gate = gate
        self.per_check: list[int] = []
        self.threads: list[str] = []
        self._lock = threading.Lock()

    def factory(self, spec: DatabaseSpec) -> sa.Engine:
        """Return a reflection engine for ``spec`` that is counted."""
        engine = build_reflection_engine(spec)
        self.watch(engine)
        return engine

    def watch(self, engine: sa.Engine) -> None:
        """Count the connections and statements of ``engine``."""
        sa.event.listen(engine, "connect", self._on_connect)
        sa.event.listen(engine, "before_cursor_execute", self._on_execute)
        sa.event.listen(engine, "checkin", self._on_checkin)

    def _on_connect(self, dbapi_connection: Any, record: Any) -> None:
        record.info["statements"] = 0
        with self._lock:
            self.threads.append(threading.current_thread().name)
        if self.gate is not None:
            self.gate.wait(timeout=10)

    def _on_execute(self, connection: sa.Connection, *args: Any) -> None:
        connection.info["statements"] += 1

    def _on_checkin(self, dbapi_connection: Any, record: Any) -> None:
        with self._lock:
            self.per_check.append(record.info.get("statements", 0))

    @property
    def checks(self) -> int:
        """Return how many checks have finished."""
        with self._lock:
            return len(self.per_check)


@pytest.fixture
def scheduler() -> Iterator[BaseScheduler]:
    """Yield a started scheduler, shut down after the test."""
    scheduler = make_scheduler()
    scheduler.start()
    yield scheduler
    scheduler.shutdown(wait=False)


@pytest.fixture
def monitors(
    scheduler: BaseScheduler,
) -> Iterator[Callable[..., SchemaMonitor]]:
    """Yield a factory of monitors on the scheduler, closed after."""
    made: list[SchemaMonitor] = []

    def make(**options: Any) -> SchemaMonitor:
        options.setdefault("state_dir", None)
        monitor = SchemaMonitor(scheduler, **options)
        made.append(monitor)
        return monitor

    yield make
    for monitor in made:
        monitor.close()


def run_sql(url: URL, *statements: str) -> None:
    """Run ``statements`` on ``url`` and commit."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as connection:
            for statement in statements:
                connection.exec_driver_sql(statement)
    finally:
        engine.dispose()


def create_shop(url: URL) -> None:
    """Create the tables customer and audit_log."""
    run_sql(
        url,
        "CREATE TABLE customer"
        " (id INTEGER PRIMARY KEY, name VARCHAR(80) NOT NULL)",
        "CREATE TABLE audit_log (id INTEGER PRIMARY KEY, msg VARCHAR(200))",
    )


@pytest.fixture
def shop(db_url: URL) -> URL:
    """Return a database of each backend holding the shop tables."""
    create_shop(db_url)
    return db_url


def fingerprint_of(url: URL) -> str:
    """Return the catalog fingerprint of ``url``, as the monitor sees it."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        return schema.fingerprint(engine, ReflectionScope())
    finally:
        engine.dispose()


def fingerprint_cost(url: URL) -> int:
    """Return the statements one fingerprint on its own connection runs."""
    counted = Counted()
    engine = counted.factory(spec("probe", url))
    try:
        # The first connection may also initialise the dialect.
        for _ in range(2):
            with engine.connect() as connection:
                schema.fingerprint(connection, ReflectionScope())
    finally:
        engine.dispose()
    return counted.per_check[-1]


def named(
    events: Sequence[Mapping[str, Any]], event: str
) -> list[Mapping[str, Any]]:
    """Return the captured events called ``event``."""
    return [entry for entry in events if entry["event"] == event]


def generation_is(
    monitor: SchemaMonitor, name: str, generation: int
) -> Callable[[], bool]:
    """Return a predicate: ``name`` has reached ``generation``."""
    return lambda: monitor.generation(name) >= generation


def only_cache_file(state_dir: Path) -> Path:
    """Return the one cache file under ``state_dir``."""
    files = sorted((state_dir / "schemas").glob("*.json"))
    assert 1 == len(files), files
    return files[0]


# Reflection on a schedule.


def test_first_reflection_runs_on_schema_threads(
    monitors: Callable[..., SchemaMonitor], shop: URL
) -> None:
    """A new database is reflected at once, on dynaconn-schema threads."""
    counted = Counted()
    monitor = monitors(engine_factory=counted.factory)

    with capture_logs() as events:
        monitor.sync({"shop": spec("shop", shop)})
        wait_for(generation_is(monitor, "shop", 1), what="first reflection")

    reflected = named(events, "schema.reflected")
    expected = [{"database": "shop", "tables": 2, "generation": 1}]
    assert expected == [
        {key: event[key] for key in ("database", "tables", "generation")}
        for event in reflected
    ]
    assert [] == named(events, "schema.changed")
    assert ["audit_log", "customer"] == monitor.tables("shop")
    assert counted.threads
    assert all(
        name.startswith("dynaconn-schema_") for name in counted.threads
    ), counted.threads


CHANGES = {
    "add_column": (
        "ALTER TABLE customer ADD COLUMN email VARCHAR(80)",
        {
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
        },
    ),
    "create_table": (
        "CREATE TABLE invoice (id INTEGER PRIMARY KEY, total INTEGER)",
        {
            "tables_added": ["invoice"],
            "tables_removed": [],
            "tables_altered": {},
        },
    ),
    "drop_table": (
        "DROP TABLE audit_log",
        {
            "tables_added": [],
            "tables_removed": ["audit_log"],
            "tables_altered": {},
        },
    ),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_change_is_detected_within_one_interval(
    monitors: Callable[..., SchemaMonitor], shop: URL, change: str
) -> None:
    """A DDL change raises the generation and logs one schema.changed."""
    statement, diff = CHANGES[change]
    counted = Counted()
    seen: list[str] = []
    monitor = monitors(engine_factory=counted.factory, on_change=seen.append)
    monitor.sync({"shop": spec("shop", shop)})
    wait_for(generation_is(monitor, "shop", 1), what="first reflection")

    with capture_logs() as events:
        run_sql(shop, statement)
        wait_for(
            generation_is(monitor, "shop", 2),
            timeout=INTERVAL + SLACK,
            what="change detected",
        )
        # Two more checks find nothing new.
        checks = counted.checks
        wait_for(lambda: counted.checks >= checks + 2, what="two checks")

    changed = named(events, "schema.changed")
    expected = [
        {
            "database": "shop",
            "generation": 2,
            "fingerprint": fingerprint_of(shop),
            "log_level": "info",
            **diff,
        }
    ]
    assert expected == [
        {key: event[key] for key in expected[0]} for event in changed
    ]
    assert 2 == monitor.generation("shop")
    assert ["shop", "shop"] == seen


def test_unchanged_schema_is_only_fingerprinted(
    monitors: Callable[..., SchemaMonitor], shop: URL
) -> None:
    """With no change, checks run the fingerprint only and log nothing."""
    counted = Counted()
    monitor = monitors(engine_factory=counted.factory)
    monitor.sync({"shop": spec("shop", shop)})
    wait_for(generation_is(monitor, "shop", 1), what="first reflection")

    with capture_logs() as events:
        wait_for(lambda: counted.checks >= 4, what="several checks")

    cost = fingerprint_cost(shop)
    assert [cost] * 3 == counted.per_check[1:4]
    assert counted.per_check[0] > cost
    assert [] == [
        event
        for event in events
        if event["event"] in {"schema.changed", "schema.reflected"}
    ]
    assert 1 == monitor.generation("shop")


def test_tables_wait_for_the_first_reflection(
    monitors: Callable[..., SchemaMonitor], shop: URL
) -> None:
    """Right after sync, tables() answers in full, never an empty list."""
    monitor = monitors()

    monitor.sync({"shop": spec("shop", shop, interval=LONG)})
    tables = monitor.tables("shop")

    assert ["audit_log", "customer"] == tables
    assert 1 == monitor.generation("shop")


def test_generation_is_zero_before_any_reflection(
    monitors: Callable[..., SchemaMonitor], shop: URL
) -> None:
    """A database whose first reflection is held back is at generation 0."""
    gate = threading.Event()
    counted = Counted(gate=gate)
    monitor = monitors(engine_factory=counted.factory)
    try:
        monitor.sync({"shop": spec("shop", shop)})
        generation = monitor.generation("shop")
    finally:
        gate.set()

    assert 0 == generation


# On demand.


def test_describe_reflects_a_table_just_created(
    monitors: Callable[..., SchemaMonitor], shop: URL
) -> None:
    """A table created after the last check is described on demand."""
    monitor = monitors()
    monitor.sync({"shop": spec("shop", shop, interval=LONG)})
    wait_for(generation_is(monitor, "shop", 1), what="first reflection")
    run_sql(shop, "CREATE TABLE invoice (id INTEGER PRIMARY KEY, total INT)")

    with capture_logs() as events:
        description = monitor.describe("shop", "invoice")

    assert ["id", "total"] == [
        column["name"] for column in description["columns"]
    ]
    assert ["id"] == description["primary_key"]
    assert 2 == monitor.generation("shop")
    expected = [["invoice"]]
    assert expected == [
        event["tables_added"] for event in named(events, "schema.changed")
    ]


def test_unknown_table_names_close_matches_and_spares_the_database(
    monitors: Callable[..., SchemaMonitor], shop: URL
) -> None:
    """A missing table raises with close matches after one check only."""
    counted = Counted()
    monitor = monitors(engine_factory=counted.factory)
    monitor.sync({"shop": spec("shop", shop, interval=LONG)})
    wait_for(lambda: counted.checks >= 1, what="first reflection")

    with pytest.raises(UnknownTableError) as caught:
        monitor.describe("shop", "custmer")
    for _ in range(5):
        with pytest.raises(UnknownTableError):
            monitor.describe("shop", "custmer")

    message = str(caught.value)
    assert "'shop'" in message
    assert "'custmer'" in message
    assert "['customer']" in message
    assert isinstance(caught.value, KeyError)
    assert 2 == counted.checks


def test_description_handed_out_never_changes_after_a_new_reflection(
    monitors: Callable[..., SchemaMonitor], sqlite_url: URL
) -> None:
    """A new reflection replaces the state; old descriptions stay as read."""
    create_shop(sqlite_url)
    monitor = monitors()
    monitor.sync({"shop": spec("shop", sqlite_url, interval=LONG)})
    before = monitor.describe("shop", "customer")
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as connection:
        connection.execute(sa.text("ALTER TABLE customer ADD COLUMN x TEXT"))
    engine.dispose()

    monitor.refresh("shop")

    assert 2 == len(before["columns"])
    assert 3 == len(monitor.describe("shop", "customer")["columns"])


def test_unknown_database_raises(
    monitors: Callable[..., SchemaMonitor], sqlite_url: URL
) -> None:
    """Every read of a database not watched raises UnknownDatabaseError."""
    create_shop(sqlite_url)
    monitor = monitors()
    monitor.sync({"shop": spec("shop", sqlite_url, interval=LONG)})
    monitor.sync({})

    for read in (
        monitor.generation,
        monitor.tables,
        monitor.refresh,
        lambda name: monitor.describe(name, "customer"),
    ):
        with pytest.raises(UnknownDatabaseError) as caught:
            read("shop")
        assert "'shop'" in str(caught.value)


def test_changed_interval_keeps_schema_and_generation(
    monitors: Callable[..., SchemaMonitor], sqlite_url: URL
) -> None:
    """A new reflect_interval is no new schema: nothing is re-announced."""
    create_shop(sqlite_url)
    monitor = monitors()
    monitor.sync({"shop": spec("shop", sqlite_url, interval=LONG)})
    wait_for(generation_is(monitor, "shop", 1), what="first reflection")

    with capture_logs() as events:
        monitor.sync({"shop": spec("shop", sqlite_url, interval=LONG / 2)})
        generation = monitor.generation("shop")
        tables = monitor.tables("shop")

    assert 1 == generation
    assert ["audit_log", "customer"] == tables
    assert [] == named(events, "schema.reflected")


def test_section_pointing_elsewhere_gets_a_new_generation(
    monitors: Callable[..., SchemaMonitor], tmp_path: Path
) -> None:
    """A section moved to another database never serves the old tables."""
    first, second = (
        sa.engine.URL.create("sqlite", database=str(tmp_path / f"{n}.db"))
        for n in ("a", "b")
    )
    create_shop(first)
    run_sql(second, "CREATE TABLE other (id INTEGER PRIMARY KEY)")
    monitor = monitors(state_dir=str(tmp_path / "state"))
    monitor.sync({"shop": spec("shop", first, interval=LONG)})
    wait_for(generation_is(monitor, "shop", 1), what="first reflection")

    monitor.sync({"shop": spec("shop", second, interval=LONG)})

    assert ["other"] == monitor.tables("shop")
    assert 3 == monitor.generation("shop")
    assert 2 == len(list((tmp_path / "state" / "schemas").glob("*.json")))


# Failures.


@pytest.mark.postgresql
def test_failed_reflection_keeps_the_previous_schema(
    monitors: Callable[..., SchemaMonitor], pg_url: URL
) -> None:
    """A refused check warns, masks the password and keeps the tables."""
    create_shop(pg_url)
    monitor = monitors()

    with TcpProxy("127.0.0.1", pg_url.port or 5432) as proxy:
        url = proxy.url(pg_url).set(password=PLANTED)
        monitor.sync({"crm": spec("crm", url, interval=LONG)})
        wait_for(generation_is(monitor, "crm", 1), what="first reflection")
        proxy.set_mode("refuse")
        with capture_logs() as events:
            diff = monitor.refresh("crm")

    failed = named(events, "schema.reflect_failed")
    expected = [("crm", "warning", "OperationalError", 1)]
    assert expected == [
        (
            event["database"],
            event["log_level"],
            event["error_class"],
            event["consecutive_failures"],
        )
        for event in failed
    ]
    assert diff is None
    assert ["audit_log", "customer"] == monitor.tables("crm")
    assert 1 == monitor.generation("crm")
    assert PLANTED not in repr(events)


@pytest.mark.parametrize("backend", ["pg_url", "mysql_url"])
def test_close_returns_while_a_reflection_hangs(
    scheduler: BaseScheduler, backend: str, request: pytest.FixtureRequest
) -> None:
    """close() does not wait for a check stuck on a silent host."""
    url: URL = request.getfixturevalue(backend)
    connecting = threading.Event()

    def factory(spec: DatabaseSpec) -> sa.Engine:
        engine = build_reflection_engine(spec)
        sa.event.listen(engine, "do_connect", lambda *args: connecting.set())
        return engine

    monitor = SchemaMonitor(scheduler, state_dir=None, engine_factory=factory)
    with TcpProxy("127.0.0.1", url.port or 0) as proxy, capture_logs() as logs:
        proxy.set_mode("blackhole")
        monitor.sync({"dead": spec("dead", proxy.url(url))})
        wait_for(connecting.is_set, what="reflection started")

        began = time.monotonic()
        monitor.close()
        took = time.monotonic() - began

    assert took < 0.5, took
    # The check that ends after close() is dropped without a word.
    assert [] == named(logs, "schema.reflect_failed")


# The disk cache.


def test_restart_serves_from_cache_before_any_reflection(
    monitors: Callable[..., SchemaMonitor], shop: URL, tmp_path: Path
) -> None:
    """A new monitor answers from the cache while its check is held."""
    state_dir = str(tmp_path / "state")
    first = monitors(state_dir=state_dir)
    first.sync({"shop": spec("shop", shop)})
    wait_for(generation_is(first, "shop", 1), what="first reflection")
    run_sql(shop, "ALTER TABLE customer ADD COLUMN email VARCHAR(80)")
    wait_for(generation_is(first, "shop", 2), what="change detected")
    first.close()

    gate = threading.Event()
    counted = Counted(gate=gate)
    second = monitors(state_dir=state_dir, engine_factory=counted.factory)
    try:
        with capture_logs() as events:
            began = time.monotonic()
            second.sync({"shop": spec("shop", shop)})
            tables = second.tables("shop")
            description = second.describe("shop", "customer")
            generation = second.generation("shop")
            took = time.monotonic() - began
            checks_while_held = counted.checks
            gate.set()
            wait_for(lambda: counted.checks >= 2, what="checks after restart")
    finally:
        gate.set()

    assert ["audit_log", "customer"] == tables
    assert ["id", "name", "email"] == [
        column["name"] for column in description["columns"]
    ]
    assert 2 == generation
    assert 0 == checks_while_held
    assert took < 1.0, took
    assert [2] == [
        event["generation"] for event in named(events, "schema.cache_loaded")
    ]
    assert [] == [
        event
        for event in events
        if event["event"] in {"schema.changed", "schema.reflected"}
    ]
    assert 2 == second.generation("shop")


def test_restart_after_a_change_logs_it_against_the_cache(
    monitors: Callable[..., SchemaMonitor], shop: URL, tmp_path: Path
) -> None:
    """A change made while the daemon was down is one schema.changed."""
    state_dir = str(tmp_path / "state")
    first = monitors(state_dir=state_dir)
    first.sync({"shop": spec("shop", shop, interval=LONG)})
    wait_for(generation_is(first, "shop", 1), what="first reflection")
    first.close()
    run_sql(shop, "ALTER TABLE customer ADD COLUMN email VARCHAR(80)")

    second = monitors(state_dir=state_dir)
    with capture_logs() as events:
        second.sync({"shop": spec("shop", shop, interval=LONG)})
        wait_for(generation_is(second, "shop", 2), what="change detected")

    expected: list[tuple[dict[str, Any], list[str]]] = [({}, ["email"])]
    assert expected == [
        (
            {
                key: event[key]
                for key in ("tables_added", "tables_removed")
                if event[key]
            },
            event["tables_altered"]["customer"]["columns_added"],
        )
        for event in named(events, "schema.changed")
    ]
    assert [] == named(events, "schema.reflected")


def test_tables_wait_is_bounded_while_reflection_hangs(
    monitors: Callable[..., SchemaMonitor], sqlite_url: URL
) -> None:
    """With no cache and a held check, tables() gives up after its timeout."""
    create_shop(sqlite_url)
    gate = threading.Event()
    counted = Counted(gate=gate)
    monitor = monitors(engine_factory=counted.factory, on_demand_timeout=0.3)
    try:
        monitor.sync({"shop": spec("shop", sqlite_url)})
        began = time.monotonic()
        tables = monitor.tables("shop")
        took = time.monotonic() - began
    finally:
        gate.set()

    assert [] == tables
    assert 0.25 < took < 1.5, took


@pytest.mark.postgresql
def test_cache_file_layout(
    monitors: Callable[..., SchemaMonitor], pg_url: URL, tmp_path: Path
) -> None:
    """The cache is one 0640 JSON file per database, with no password."""
    create_shop(pg_url)
    url = pg_url.set(password=PLANTED)
    monitor = monitors(state_dir=str(tmp_path))
    monitor.sync({"crm": spec("crm", url)})
    wait_for(generation_is(monitor, "crm", 1), what="first reflection")

    path = only_cache_file(tmp_path)
    raw = path.read_text()
    content = json.loads(raw)

    assert cache_file_name(spec("crm", url)) == path.name
    assert CACHE_FILE_MODE == stat.S_IMODE(os.stat(path).st_mode)
    assert {
        "format_version",
        "database",
        "fingerprint",
        "generation",
        "saved_at",
        "tables",
    } == set(content)
    expected = (CACHE_FORMAT_VERSION, "crm", fingerprint_of(pg_url), 1)
    assert expected == (
        content["format_version"],
        content["database"],
        content["fingerprint"],
        content["generation"],
    )
    assert monitor.describe("crm", "customer") == content["tables"]["customer"]
    assert PLANTED not in raw


def test_cache_file_name_follows_the_connection_not_the_password(
    sqlite_url: URL,
) -> None:
    """The password never changes the name; the host, port or user do."""
    base = sa.engine.URL.create(
        "postgresql+psycopg",
        username="app",
        password="one",
        host="db1",
        port=5432,
        database="crm",
    )
    name = cache_file_name(spec("crm", base))

    assert name == cache_file_name(spec("crm", base.set(password="two")))
    for other in (
        base.set(host="db2"),
        base.set(port=5433),
        base.set(username="admin"),
        base.set(database="crm2"),
        base.set(drivername="postgresql+psycopg2"),
    ):
        assert name != cache_file_name(spec("crm", other)), other
    assert name != cache_file_name(spec("crm2", base))


CORRUPT = {
    "garbage": (b"{not json", "not valid JSON"),
    "binary": (b"\xff\xfe\x00", "not valid JSON"),
    "list": (b"[]", "not a JSON object"),
    "old_version": (
        b'{"format_version": 0, "database": "shop"}',
        "format_version",
    ),
    "other_database": (
        b'{"format_version": 1, "database": "crm"}',
        "written for database 'crm'",
    ),
    "bad_tables": (
        b'{"format_version": 1, "database": "shop", "generation": 3,'
        b' "fingerprint": "x", "tables": {"t": 1}}',
        "table descriptions",
    ),
}


@pytest.mark.parametrize("kind", sorted(CORRUPT))
def test_corrupt_cache_is_ignored_with_one_warning(
    monitors: Callable[..., SchemaMonitor],
    sqlite_url: URL,
    tmp_path: Path,
    kind: str,
) -> None:
    """A bad cache file warns once; the database is reflected anew."""
    data, reason = CORRUPT[kind]
    create_shop(sqlite_url)
    state_dir = tmp_path / "state"
    first = monitors(state_dir=str(state_dir))
    first.sync({"shop": spec("shop", sqlite_url, interval=LONG)})
    wait_for(generation_is(first, "shop", 1), what="first reflection")
    first.close()
    path = only_cache_file(state_dir)
    path.write_bytes(data)

    second = monitors(state_dir=str(state_dir))
    with capture_logs() as events:
        second.sync({"shop": spec("shop", sqlite_url, interval=LONG)})
        tables = second.tables("shop")

    ignored = named(events, "schema.cache_ignored")
    assert [(str(path), "warning")] == [
        (event["path"], event["log_level"]) for event in ignored
    ]
    assert reason in ignored[0]["reason"]
    assert ["audit_log", "customer"] == tables
    assert 1 == len(named(events, "schema.reflected"))
    assert (
        CACHE_FORMAT_VERSION == json.loads(path.read_bytes())["format_version"]
    )


def test_unwritable_cache_warns_once_and_works_in_memory(
    monitors: Callable[..., SchemaMonitor], sqlite_url: URL, tmp_path: Path
) -> None:
    """A state dir that cannot take files warns once per database."""
    create_shop(sqlite_url)
    # A file where the folder should be fails even for root.
    (tmp_path / "schemas").write_text("not a folder")
    monitor = monitors(state_dir=str(tmp_path))

    with capture_logs() as events:
        monitor.sync({"shop": spec("shop", sqlite_url, interval=LONG)})
        wait_for(generation_is(monitor, "shop", 1), what="first reflection")
        run_sql(sqlite_url, "ALTER TABLE customer ADD COLUMN email TEXT")
        first_diff = monitor.refresh("shop")
        run_sql(sqlite_url, "DROP TABLE audit_log")
        second_diff = monitor.refresh("shop")

    unwritable = named(events, "schema.cache_unwritable")
    assert [("shop", "warning")] == [
        (event["database"], event["log_level"]) for event in unwritable
    ]
    assert first_diff is not None
    assert second_diff is not None
    assert ["audit_log"] == second_diff["tables_removed"]
    assert ["customer"] == monitor.tables("shop")
    assert 3 == monitor.generation("shop")
    assert [] == named(events, "schema.cache_ignored")


def test_no_state_dir_disables_the_cache_with_one_event(
    scheduler: BaseScheduler,
) -> None:
    """Without a state dir the monitor says once that it keeps no cache."""
    with capture_logs() as events:
        monitor = SchemaMonitor(scheduler, state_dir=None)
        monitor.close()

    assert [("schema.cache_disabled", "info")] == [
        (event["event"], event["log_level"]) for event in events
    ]
