"""5. Scale: a daemon with 1,000 databases under health checks.

- Steady state: every database reachable (SQLite files plus a few
  PostgreSQL and MariaDB sections); the daemon's CPU over a window
  after warm-up, from ``psutil`` ``cpu_times``, and its RSS.
- Unreachable hosts: some of the databases point at a port that
  refuses, some at a black hole (a listener that never accepts); how
  late the healthy databases' checks start, from the daemon's debug
  ``health.checked`` events: a check's start is its event time minus
  its latency, and it was due at the previous event's time plus that
  event's ``next_in``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sqlite3
import time
from typing import TYPE_CHECKING, Any

import psutil
from sqlalchemy.engine import URL

from bench._common import (
    MYSQL_ADMIN,
    PG_ADMIN,
    Daemon,
    Row,
    ini_section,
    percentile,
    scratch_folder,
    server_database,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    from bench._common import Sizes

__all__ = ["SERVER_SECTIONS", "run"]

#: How many sections of each server kind the steady state holds.
SERVER_SECTIONS = 5


def _sqlite_sections(folder: str, count: int, prefix: str) -> str:
    text = []
    for index in range(count):
        path = os.path.join(folder, f"{prefix}{index}.sqlite3")
        # Probes open the file read-only: it must exist to be up.
        with contextlib.closing(sqlite3.connect(path)) as connection:
            connection.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER)")
        text.append(
            ini_section(
                f"{prefix}{index}", URL.create("sqlite", database=path)
            )
        )
    return "".join(text)


def _server_sections(pg: URL, maria: URL) -> str:
    return "".join(
        ini_section(f"{kind}{index}", url)
        for index in range(SERVER_SECTIONS)
        for kind, url in (("pg", pg), ("maria", maria))
    )


@contextlib.contextmanager
def _dead_ports() -> Iterator[tuple[int, int]]:
    """Yield a port that refuses and a port that never answers."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    refusing = closed.getsockname()[1]
    closed.close()
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(1)
    try:
        yield refusing, hole.getsockname()[1]
    finally:
        hole.close()


def _header(interval: float) -> str:
    return f"[DEFAULT]\nhealth_interval = {interval:g}s\n\n"


def _steady(sizes: Sizes, pg: URL, maria: URL) -> dict[str, Any]:
    with scratch_folder("scale") as folder:
        servers = _server_sections(pg, maria)
        sqlite_count = sizes.scale_databases - 2 * SERVER_SECTIONS
        ini = (
            _header(sizes.scale_interval)
            + _sqlite_sections(folder, sqlite_count, "lite")
            + servers
        )
        with Daemon(folder, ini) as daemon:
            daemon.wait_ready()
            process = psutil.Process(daemon.pid)
            time.sleep(sizes.scale_warmup)
            before = process.cpu_times()
            started = time.monotonic()
            rss: list[int] = []
            while time.monotonic() - started < sizes.scale_window:
                rss.append(process.memory_info().rss)
                time.sleep(1.0)
            after = process.cpu_times()
            elapsed = time.monotonic() - started
            ups = sum(
                1
                for event in daemon.events()
                if event.get("event") == "health.changed"
                and event.get("to") == "up"
            )
        cpu = (after.user - before.user) + (after.system - before.system)
        return {
            "cpu_percent": 100 * cpu / elapsed,
            "rss_mb": [value / 2**20 for value in rss],
            "elapsed": elapsed,
            "up": ups,
        }


def _when(event: dict[str, Any]) -> float:
    stamp = datetime.datetime.fromisoformat(event["timestamp"])
    return stamp.timestamp()


def lateness(
    events: list[dict[str, Any]], healthy: set[str], since: float
) -> list[float]:
    """Return how late each healthy check started, in seconds."""
    last: dict[str, dict[str, Any]] = {}
    late: list[float] = []
    for event in events:
        name = event.get("database")
        if name not in healthy or not str(event.get("event")).startswith(
            "health."
        ):
            continue
        previous = last.get(name)
        last[name] = event
        if (
            event.get("event") != "health.checked"
            or previous is None
            or previous.get("event") != "health.checked"
            or _when(previous) < since
        ):
            continue
        started = _when(event) - event["latency_ms"] / 1000
        due = _when(previous) + previous["next_in"]
        late.append(started - due)
    return late


def _unreachable(sizes: Sizes, pg: URL, maria: URL) -> dict[str, Any]:
    with scratch_folder("late") as folder, _dead_ports() as ports:
        refusing, hole = ports
        dead = sizes.scale_unreachable
        healthy_sqlite = sizes.scale_databases - dead - 2 * SERVER_SECTIONS
        dead_sections = "".join(
            ini_section(
                f"dead{index}",
                PG_ADMIN.set(port=refusing if index % 2 else hole),
            )
            for index in range(dead)
        )
        ini = (
            _header(sizes.scale_interval)
            + _sqlite_sections(folder, healthy_sqlite, "lite")
            + _server_sections(pg, maria)
            + dead_sections
        )
        healthy = {f"lite{index}" for index in range(healthy_sqlite)} | {
            f"{kind}{index}"
            for index in range(SERVER_SECTIONS)
            for kind in ("pg", "maria")
        }
        with Daemon(folder, ini, log_level="debug") as daemon:
            daemon.wait_ready()
            time.sleep(sizes.scale_warmup)
            since = time.time()
            time.sleep(sizes.lateness_window)
            events = daemon.events()
        late = lateness(events, healthy, since)
        down = {
            event["database"]
            for event in events
            if event.get("event") == "health.changed"
            and event.get("to") == "down"
        }
        return {"late": late, "down": down, "healthy": len(healthy)}


def run(sizes: Sizes) -> list[Row]:
    """Measure the steady state, then lateness beside dead hosts."""
    with server_database(PG_ADMIN) as pg, server_database(MYSQL_ADMIN) as my:
        steady = _steady(sizes, pg, my)
        dead = _unreachable(sizes, pg, my)
    n, interval = sizes.scale_databases, sizes.scale_interval
    late_ms = [value * 1000 for value in dead["late"]]
    p50, p99 = percentile(late_ms, 0.5), percentile(late_ms, 0.99)
    rss = steady["rss_mb"]
    return [
        Row(
            comparison="5. scale",
            variant=f"{n} databases, {interval:g} s checks: daemon CPU",
            value=steady["cpu_percent"],
            unit="% of a core",
            trials=1,
            goal="<= 5%",
            met=steady["cpu_percent"] <= 5,
            note=f"over {steady['elapsed']:.0f} s after"
            f" {sizes.scale_warmup:g} s warm-up; {steady['up']} up",
        ),
        Row(
            comparison="5. scale",
            variant=f"{n} databases: daemon RSS",
            value=max(rss),
            unit="MB",
            spread=f"{min(rss):.1f}-{max(rss):.1f}",
            trials=len(rss),
            goal="<= 200 MB",
            met=max(rss) <= 200,
            note="max of 1 s samples over the CPU window",
        ),
        Row(
            comparison="5. scale",
            variant=f"{sizes.scale_unreachable} of {n} unreachable:"
            " healthy checks late, p99",
            value=p99,
            unit="ms",
            spread=f"p50 {p50:.1f}",
            trials=len(late_ms),
            goal="<= 1000 ms",
            met=p99 <= 1000,
            note=f"{len(dead['down'])} marked down; half refuse, half"
            f" black hole; max {max(late_ms):.0f} ms",
        ),
    ]
