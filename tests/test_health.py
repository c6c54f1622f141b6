"""Specifications of health checks: probes, the state machine, the monitor.

Servers are made to fail through a TCP proxy the test owns, or a
throwaway PostgreSQL from pytest-postgresql; the shared servers are
never stopped.
"""

from __future__ import annotations

import itertools
import random
import sqlite3
import time
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy.engine import URL
from structlog.testing import capture_logs

from dynaconnd.errors import UnknownDatabaseError
from dynaconnd.health import (
    DOWN,
    SLOW,
    UNKNOWN,
    UP,
    HealthMonitor,
    HealthState,
    ProbeResult,
    Transition,
    build_probe_engine,
    probe,
    probe_connect_args,
)
from dynaconnd.scheduling import make_scheduler
from dynaconnd.spec import DatabaseSpec, Schedule
from tests.helpers import wait_for
from tests.proxy import TcpProxy
from tests.servers import free_port, superuser_url, throwaway_postgresql

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping, Sequence
    from pathlib import Path

__all__ = ["throwaway_postgresql"]

PLANTED = "pl4nted-s3cret"


def ok(latency_ms: float = 5.0, at: float = 0.0) -> ProbeResult:
    """Return a successful result."""
    return ProbeResult(ok=True, latency_ms=latency_ms, checked_at=at)


def failed(at: float = 0.0) -> ProbeResult:
    """Return a failed result."""
    return ProbeResult(
        ok=False,
        latency_ms=1.0,
        error_class="OperationalError",
        error="connection refused",
        checked_at=at,
    )


def feed(state: HealthState, *results: ProbeResult) -> list[str]:
    """Record ``results``; return the state after each one."""
    states = []
    for result in results:
        state.record(result)
        states.append(state.state)
    return states


def spec(
    name: str, url: URL, *, interval: float = 0.2, timeout: float = 1.0
) -> DatabaseSpec:
    """Return a spec checked every ``interval`` seconds."""
    return DatabaseSpec(
        name=name,
        url=url,
        schedule=Schedule(health_interval=interval, health_timeout=timeout),
    )


def changes(
    events: Sequence[Mapping[str, Any]], name: str
) -> list[tuple[str, str]]:
    """Return the (from, to) of every health.changed event of ``name``."""
    return [
        (event["from"], event["to"])
        for event in events
        if event["event"] == "health.changed" and event["database"] == name
    ]


# The state machine.


def test_first_success_sets_up_at_once() -> None:
    """From unknown, one successful probe is enough to be up."""
    state = HealthState(interval=1.0)

    transition = state.record(ok(at=7.0))

    expected = (
        Transition(
            previous=UNKNOWN,
            current=UP,
            at=7.0,
            result=ok(at=7.0),
            consecutive_failures=0,
        ),
        7.0,
    )
    assert expected == (transition, state.since)


def test_first_slow_success_sets_slow() -> None:
    """From unknown, a success above the threshold sets slow."""
    state = HealthState(interval=1.0, slow_ms=100.0)

    expected = [SLOW]
    assert expected == feed(state, ok(latency_ms=150.0))


def test_failures_from_unknown_need_the_fall_count() -> None:
    """From unknown, only ``fall`` failures in a row set down."""
    state = HealthState(interval=1.0, fall=3)

    expected = [UNKNOWN, UNKNOWN, DOWN]
    assert expected == feed(state, *[failed()] * 3)


def test_one_failure_while_up_flips_nothing() -> None:
    """A single bad probe leaves an up database up."""
    state = HealthState(interval=1.0, fall=3)

    expected = [UP, UP, UP]
    assert expected == feed(state, ok(), failed(), ok())


def test_fall_failures_in_a_row_set_down() -> None:
    """The third failure in a row sets down and says how many failed."""
    state = HealthState(interval=1.0, fall=3)
    state.record(ok())

    transitions = [state.record(failed(at=float(n))) for n in range(3)]

    last = transitions[2]
    assert last is not None
    expected = [None, None, (UP, DOWN, 3)]
    assert expected == [
        *transitions[:2],
        (last.previous, last.current, last.consecutive_failures),
    ]


def test_a_success_restarts_the_fall_count() -> None:
    """Failures separated by a success never add up to down."""
    state = HealthState(interval=1.0, fall=3)

    states = feed(state, ok(), failed(), failed(), ok(), failed(), failed())

    expected = ([UP] * 6, 2)
    assert expected == (states, state.consecutive_failures)


def test_rise_successes_bring_a_down_database_back() -> None:
    """From down, ``rise`` successes in a row set up again."""
    state = HealthState(interval=1.0, rise=2, fall=1)

    expected = [DOWN, DOWN, DOWN, UP]
    assert expected == feed(state, failed(), ok(), failed(), ok(), ok())[1:]


def test_down_comes_back_as_slow_when_latency_is_high() -> None:
    """A database that answers slowly after an outage comes back slow."""
    state = HealthState(interval=1.0, rise=2, fall=1, slow_ms=100.0)

    states = feed(state, failed(), ok(latency_ms=500), ok(latency_ms=500))

    expected = [DOWN, DOWN, SLOW]
    assert expected == states


def test_slow_needs_rise_probes_in_a_row_over_the_threshold() -> None:
    """Up turns slow, and back, only after ``rise`` probes on the far side."""
    state = HealthState(interval=1.0, rise=2, slow_ms=100.0)
    fast, sluggish = ok(latency_ms=10.0), ok(latency_ms=300.0)

    states = feed(state, fast, sluggish, fast, sluggish, sluggish, fast, fast)

    expected = [UP, UP, UP, UP, SLOW, SLOW, UP]
    assert expected == states


def test_history_keeps_the_last_results() -> None:
    """Only the newest ``history`` results are kept, oldest first."""
    state = HealthState(interval=1.0, history=3)

    feed(state, *[ok(at=float(n)) for n in range(5)])

    expected = [2.0, 3.0, 4.0]
    assert expected == [r.checked_at for r in state.history]


def test_delay_is_the_interval_unless_down() -> None:
    """Up, slow, unknown and a failing but not yet down state wait interval."""
    state = HealthState(interval=2.0, fall=3)
    delays = [state.next_delay()]
    for result in (ok(), failed(), failed()):
        state.record(result)
        delays.append(state.next_delay())

    expected = [2.0, 2.0, 2.0, 2.0]
    assert expected == delays


def test_backoff_doubles_up_to_the_maximum() -> None:
    """While down, each failure doubles the wait, up to max_backoff."""
    state = HealthState(interval=1.0, fall=2, max_backoff=5.0, jitter=0.0)
    delays = []
    for _ in range(7):
        state.record(failed())
        delays.append(state.next_delay())

    expected = [1.0, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    assert expected == delays


def test_default_max_backoff_is_four_intervals() -> None:
    """Without max_backoff a down database waits at most four intervals."""
    state = HealthState(interval=3.0, fall=1, jitter=0.0)
    feed(state, *[failed()] * 10)

    expected = 12.0
    assert expected == state.next_delay()


def test_jittered_delays_stay_within_bounds() -> None:
    """Jitter spreads each delay by at most +/- jitter, never past the max."""
    state = HealthState(
        interval=1.0,
        fall=1,
        max_backoff=8.0,
        jitter=0.2,
        rng=random.Random(7),
    )
    seen: list[tuple[float, float, float]] = []
    for _ in range(6):
        state.record(failed())
        low, high = state.backoff_bounds()
        seen.extend((low, state.next_delay(), high) for _ in range(200))

    assert all(low <= delay <= high for low, delay, high in seen)
    assert all(high <= 8.0 for _, _, high in seen)
    expected_bounds = (0.8, 1.2)
    assert expected_bounds == pytest.approx(seen[0][::2])
    spread = {round(delay, 2) for _, delay, _ in seen[:200]}
    assert len(spread) > 10


def test_delay_returns_to_the_interval_after_a_success() -> None:
    """The first success while down brings the next probe back to interval."""
    state = HealthState(interval=1.0, fall=1, max_backoff=10, jitter=0.0)
    feed(state, *[failed()] * 4)
    backed_off = state.next_delay()

    state.record(ok())

    expected = (8.0, 1.0)
    assert expected == (backed_off, state.next_delay())


def test_as_dict_is_plain_data() -> None:
    """The state reads as plain values a socket or a log can carry."""
    state = HealthState(interval=1.0, history=2, now=1.0)
    feed(state, ok(latency_ms=3.0, at=2.0), failed(at=3.0))

    expected = {
        "state": UP,
        "since": 2.0,
        "last_latency_ms": 1.0,
        "last_check": 3.0,
        "last_error": "connection refused",
        "last_error_class": "OperationalError",
        "last_error_at": 3.0,
        "consecutive_failures": 1,
        "history": [
            ok(latency_ms=3.0, at=2.0).as_dict(),
            failed(3.0).as_dict(),
        ],
    }
    assert expected == state.as_dict()


@pytest.mark.parametrize(
    ("options", "word"),
    [
        ({"rise": 0}, "rise"),
        ({"fall": 0}, "fall"),
        ({"history": 0}, "history"),
        ({"jitter": 1.0}, "jitter"),
        ({"max_backoff": 0.0}, "max_backoff"),
        ({"interval": 0.0}, "interval"),
    ],
)
def test_invalid_options_are_refused(
    options: dict[str, Any], word: str
) -> None:
    """Counts below one, zero intervals and full jitter are ValueErrors."""
    with pytest.raises(ValueError, match=word):
        HealthState(**{"interval": 1.0, **options})


# Probes.


def test_connect_args_bound_each_driver() -> None:
    """Each driver gets the timeouts it understands, in its own units."""
    pg = URL.create(
        "postgresql+psycopg", host="h", query={"options": "-c x=1"}
    )
    my = URL.create("mysql+pymysql", host="h")
    lite = URL.create("sqlite", database="/tmp/x.db")

    expected = [
        {"connect_timeout": 2, "options": "-c x=1 -c statement_timeout=500"},
        {"connect_timeout": 0.5, "read_timeout": 0.5, "write_timeout": 0.5},
        {"timeout": 0.5},
    ]
    assert expected == [
        probe_connect_args(url, timeout=0.5) for url in (pg, my, lite)
    ]


def test_probe_succeeds_on_each_backend(db_url: URL) -> None:
    """A reachable database answers the probe."""
    if db_url.get_backend_name() == "sqlite":
        sqlite3.connect(db_url.database or "").close()
    engine = build_probe_engine(spec("db", db_url))
    try:
        result = probe(engine, timeout=2.0)
    finally:
        engine.dispose()

    expected = (True, None, None)
    assert expected == (result.ok, result.error_class, result.error)
    assert 0.0 < result.latency_ms < 2000.0


def test_probe_never_creates_a_missing_sqlite_file(tmp_path: Path) -> None:
    """A missing SQLite file is an error, not a new empty database."""
    path = tmp_path / "missing.db"
    engine = build_probe_engine(
        spec("lite", URL.create("sqlite", database=str(path)))
    )

    result = probe(engine, timeout=1.0)

    expected = (False, "OperationalError")
    assert expected == (result.ok, result.error_class)
    assert not path.exists()


def test_probe_reports_a_refused_port_quickly() -> None:
    """Connecting to a port nothing listens on fails fast, with the reason."""
    url = URL.create(
        "postgresql+psycopg",
        username="app",
        password=PLANTED,
        host="127.0.0.1",
        port=free_port(),
        database="crm",
    )
    engine = build_probe_engine(spec("crm", url))

    result = probe(engine, timeout=1.0)

    expected = (False, "OperationalError")
    assert expected == (result.ok, result.error_class)
    assert result.error is not None
    assert "refused" in result.error
    assert PLANTED not in repr(result)
    assert result.latency_ms < 1000.0


@pytest.mark.postgresql
def test_probe_gives_up_on_a_silent_postgresql(pg_url: URL) -> None:
    """A host that accepts and never answers fails within libpq's 2 s."""
    with TcpProxy("127.0.0.1", pg_url.port or 5432) as proxy:
        proxy.set_mode("blackhole")
        engine = build_probe_engine(spec("pg", proxy.url(pg_url)))

        began = time.monotonic()
        result = probe(engine, timeout=0.5)
        took = time.monotonic() - began

    expected = (False, "ConnectionTimeout")
    assert expected == (result.ok, result.error_class)
    assert 1.5 < took < 3.5, took


@pytest.mark.mysql
def test_probe_gives_up_on_a_silent_mariadb(mysql_url: URL) -> None:
    """A MariaDB that accepts and never answers fails within the timeout."""
    with TcpProxy("127.0.0.1", mysql_url.port or 3306) as proxy:
        proxy.set_mode("blackhole")
        engine = build_probe_engine(spec("my", proxy.url(mysql_url)))

        result = probe(engine, timeout=0.5)

    expected = (False, "OperationalError")
    assert expected == (result.ok, result.error_class)
    assert result.error is not None
    assert "timed out" in result.error
    assert result.latency_ms < 1500.0


# The monitor.


@pytest.fixture
def monitors() -> Iterator[Callable[..., HealthMonitor]]:
    """Yield a factory of monitors on a started scheduler, closed after."""
    scheduler = make_scheduler()
    scheduler.start()
    made: list[HealthMonitor] = []

    def make(**options: Any) -> HealthMonitor:
        monitor = HealthMonitor(scheduler, **options)
        made.append(monitor)
        return monitor

    yield make
    for monitor in made:
        monitor.close()
    scheduler.shutdown(wait=False)


def state_of(monitor: HealthMonitor, name: str) -> str:
    """Return the state of ``name``."""
    state: str = monitor.health()[name]["state"]
    return state


@pytest.fixture
def lite(tmp_path: Path) -> Callable[[str], URL]:
    """Return a factory of existing SQLite databases."""

    def make(name: str) -> URL:
        path = tmp_path / f"{name}.db"
        sqlite3.connect(path).close()
        return URL.create("sqlite", database=str(path))

    return make


def test_new_database_is_checked_at_once(
    monitors: Callable[..., HealthMonitor], lite: Callable[[str], URL]
) -> None:
    """A database added with a long interval is still probed right away."""
    monitor = monitors()

    monitor.sync({"main": spec("main", lite("main"), interval=60.0)})

    wait_for(lambda: state_of(monitor, "main") == UP, timeout=3)


def test_sync_keeps_unchanged_replaces_changed_drops_removed(
    monitors: Callable[..., HealthMonitor],
    lite: Callable[[str], URL],
) -> None:
    """Only what changed gets a new job; state survives a change."""
    monitor = monitors()
    scheduler = monitor._scheduler
    specs = {name: spec(name, lite(name)) for name in ("a", "b", "c")}
    monitor.sync(specs)
    wait_for(
        lambda: all(r["state"] == UP for r in monitor.health().values()),
        timeout=3,
    )
    jobs = {job.name: job.id for job in scheduler.get_jobs()}
    engine_a = monitor._entries["a"].engine

    with capture_logs() as events:
        monitor.sync({"a": specs["a"], "b": spec("b", lite("b2"))})

    after = {job.name: job.id for job in scheduler.get_jobs()}
    expected_jobs = ["health check of a", "health check of b"]
    assert expected_jobs == sorted(after)
    assert jobs["health check of a"] == after["health check of a"]
    assert jobs["health check of b"] != after["health check of b"]
    assert engine_a is monitor._entries["a"].engine
    expected_health = (UP, ["a", "b"])
    assert expected_health == (
        state_of(monitor, "b"),
        sorted(monitor.health()),
    )
    expected_event = {"added": [], "changed": ["b"], "removed": ["c"]}
    synced = [e for e in events if e["event"] == "health.synced"]
    assert [expected_event] == [
        {key: e[key] for key in ("added", "changed", "removed")}
        for e in synced
    ]


def test_ping_probes_now_and_records(
    monitors: Callable[..., HealthMonitor], lite: Callable[[str], URL]
) -> None:
    """ping() answers at once and the result lands in the history."""
    monitor = monitors()
    monitor.sync({"main": spec("main", lite("main"), interval=60.0)})
    wait_for(lambda: state_of(monitor, "main") == UP, timeout=3)

    answer = monitor.ping("main")

    expected = ("main", UP, True)
    assert expected == (
        answer["database"],
        answer["state"],
        answer["ok"],
    )
    history = monitor.health()["main"]["history"]
    assert answer["checked_at"] == history[-1]["checked_at"]


def test_ping_of_an_unknown_database_raises(
    monitors: Callable[..., HealthMonitor],
) -> None:
    """Pinging a database not watched is an UnknownDatabaseError."""
    monitor = monitors()

    with pytest.raises(UnknownDatabaseError, match="nope"):
        monitor.ping("nope")


def test_close_removes_every_job(
    monitors: Callable[..., HealthMonitor], lite: Callable[[str], URL]
) -> None:
    """After close() nothing is scheduled and nothing is reported."""
    monitor = monitors()
    monitor.sync({"main": spec("main", lite("main"))})

    monitor.close()

    expected: tuple[list[Any], dict[str, Any]] = ([], {})
    assert expected == (monitor._scheduler.get_jobs(), monitor.health())


@pytest.mark.postgresql
def test_refused_database_goes_down_then_up_once_each(
    monitors: Callable[..., HealthMonitor], pg_url: URL
) -> None:
    """Refused, then back: exactly one event down and one event up."""
    interval, timeout, rise, fall, backoff = 0.2, 1.0, 2, 3, 0.4
    monitor = monitors(rise=rise, fall=fall, max_backoff=backoff)

    with (
        TcpProxy("127.0.0.1", pg_url.port or 5432) as proxy,
        capture_logs() as events,
    ):
        monitor.sync({"crm": spec("crm", proxy.url(pg_url), timeout=timeout)})
        wait_for(lambda: state_of(monitor, "crm") == UP, timeout=3)

        proxy.set_mode("refuse")
        wait_for(
            lambda: state_of(monitor, "crm") == DOWN,
            timeout=interval * fall + timeout + 0.5,
            what="down",
        )
        proxy.set_mode("forward")
        # The probe after the switch may wait out one backoff first.
        wait_for(
            lambda: state_of(monitor, "crm") == UP,
            timeout=backoff + interval * rise + 0.5,
            what="up again",
        )
        time.sleep(interval * 2)

    expected = [(UNKNOWN, UP), (UP, DOWN), (DOWN, UP)]
    assert expected == changes(events, "crm")
    down = [e for e in events if e["event"] == "health.changed"][1]
    expected_down = ("OperationalError", 3)
    assert expected_down == (
        down["error_class"],
        down["consecutive_failures"],
    )
    assert "refused" in down["error"]


@pytest.mark.mysql
def test_reset_connections_take_the_database_down(
    monitors: Callable[..., HealthMonitor], mysql_url: URL
) -> None:
    """A server that resets every connection is down until it stops."""
    monitor = monitors(max_backoff=0.4)

    with (
        TcpProxy("127.0.0.1", mysql_url.port or 3306) as proxy,
        capture_logs() as events,
    ):
        monitor.sync({"shop": spec("shop", proxy.url(mysql_url))})
        wait_for(lambda: state_of(monitor, "shop") == UP, timeout=3)
        proxy.set_mode("reset")
        wait_for(lambda: state_of(monitor, "shop") == DOWN, timeout=3)
        proxy.set_mode("forward")
        wait_for(lambda: state_of(monitor, "shop") == UP, timeout=3)

    expected = [(UNKNOWN, UP), (UP, DOWN), (DOWN, UP)]
    assert expected == changes(events, "shop")


@pytest.mark.mysql
def test_silent_database_goes_down_within_fall_timeouts(
    monitors: Callable[..., HealthMonitor], mysql_url: URL
) -> None:
    """A black hole is down after ``fall`` probes that each time out."""
    interval, timeout, fall = 0.2, 0.5, 3
    monitor = monitors(fall=fall)

    with TcpProxy("127.0.0.1", mysql_url.port or 3306) as proxy:
        monitor.sync(
            {"shop": spec("shop", proxy.url(mysql_url), timeout=timeout)}
        )
        wait_for(lambda: state_of(monitor, "shop") == UP, timeout=3)
        proxy.set_mode("blackhole")
        wait_for(
            lambda: state_of(monitor, "shop") == DOWN,
            timeout=fall * (interval + timeout) + 1.0,
            what="down",
        )
        record = monitor.health()["shop"]

    assert "timed out" in record["last_error"]


@pytest.mark.postgresql
@pytest.mark.mysql
def test_silent_databases_never_delay_the_others(
    monitors: Callable[..., HealthMonitor], pg_url: URL, mysql_url: URL
) -> None:
    """While three hosts hang, a healthy one is still checked on time."""
    interval = 0.2
    monitor = monitors()

    with (
        TcpProxy("127.0.0.1", mysql_url.port or 3306) as hole,
        capture_logs(),
    ):
        hole.set_mode("blackhole")
        specs = {
            f"dead{n}": spec(f"dead{n}", hole.url(mysql_url), timeout=1.5)
            for n in range(3)
        }
        specs["crm"] = spec("crm", pg_url, interval=interval)
        monitor.sync(specs)
        time.sleep(2.5)
        record = monitor.health()["crm"]
        # Probes still hanging then end quietly.
        monitor.close()

    checks = [result["checked_at"] for result in record["history"]]
    gaps = [later - earlier for earlier, later in itertools.pairwise(checks)]
    expected = UP
    assert expected == record["state"]
    assert len(checks) >= 8, checks
    assert max(gaps) < interval + 0.25, gaps


@pytest.mark.postgresql
def test_down_database_is_checked_with_growing_delays(
    monitors: Callable[..., HealthMonitor], pg_url: URL
) -> None:
    """Checks of a refused database spread out up to max_backoff."""
    interval, backoff = 0.1, 0.8
    monitor = monitors(fall=1, max_backoff=backoff, jitter=0.2)

    with TcpProxy("127.0.0.1", pg_url.port or 5432) as proxy:
        proxy.set_mode("refuse")
        monitor.sync(
            {"crm": spec("crm", proxy.url(pg_url), interval=interval)}
        )
        time.sleep(3.0)
        record = monitor.health()["crm"]

    checks = [result["checked_at"] for result in record["history"]]
    gaps = [later - earlier for earlier, later in itertools.pairwise(checks)]
    expected = DOWN
    assert expected == record["state"]
    assert gaps[0] < 0.2, gaps
    assert max(gaps) > backoff * 0.75, gaps
    assert max(gaps) < backoff + 0.15, gaps


def test_logs_never_carry_the_password(
    monitors: Callable[..., HealthMonitor],
) -> None:
    """A failing database with a planted password never logs it."""
    monitor = monitors(fall=1)
    url = URL.create(
        "postgresql+psycopg",
        username="app",
        password=PLANTED,
        host="127.0.0.1",
        port=free_port(),
        database="crm",
    )

    with capture_logs() as events:
        monitor.sync({"crm": spec("crm", url)})
        wait_for(lambda: state_of(monitor, "crm") == DOWN, timeout=3)

    assert PLANTED not in repr(events)
    assert PLANTED not in repr(monitor.health())


@pytest.mark.slow
def test_restarted_postgresql_is_down_then_up(
    monitors: Callable[..., HealthMonitor], throwaway_postgresql: Any
) -> None:
    """A server stopped and started again gives two events, not a flood."""
    server = throwaway_postgresql
    url = superuser_url(server)
    monitor = monitors(max_backoff=0.4)

    with capture_logs() as events:
        monitor.sync({"crm": spec("crm", url)})
        wait_for(lambda: state_of(monitor, "crm") == UP, timeout=5)
        server.stop()
        wait_for(lambda: state_of(monitor, "crm") == DOWN, timeout=5)
        server.start()
        wait_for(lambda: state_of(monitor, "crm") == UP, timeout=5)

    expected = [(UNKNOWN, UP), (UP, DOWN), (DOWN, UP)]
    assert expected == changes(events, "crm")
