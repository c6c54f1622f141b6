"""1. Cold start: a fresh process, from nothing to an instantiated class.

Four ways a new process gets the ORM class of one table, each trial in
a process of its own, the variants taking turns:

- ``automap``: SQLAlchemy automap of the whole schema, mappers
  configured, one instance made;
- ``reflect one``: reflect only that table (and the one its foreign key
  names) and map it;
- ``one by one``: reflect every table with its own ``Table(...,
  autoload_with=...)``, then map a class per table (automap over
  that ``MetaData``, so relationships too);
- ``daemon``: ``DatabaseRegistry.connect()`` and ``get_db_instance()``
  against a running dynaconnd that has the schema cached.

Each child reports two times from its first line: everything (imports
included, what a user feels) and the work after the imports.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from typing import TYPE_CHECKING, Any

from bench._common import (
    PG_ADMIN,
    Daemon,
    Row,
    fresh_process,
    ini_section,
    scratch_folder,
    server_database,
    summary,
)
from bench._schema import create_schema, target_table

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy.engine import URL

    from bench._common import Sizes

__all__ = ["VARIANTS", "run"]

_PRELUDE = """\
import json, sys, time
started = time.perf_counter()
"""

_REPORT = """\
done = time.perf_counter()
print(json.dumps({
    "total": done - started,
    "work": done - imported,
    "columns": len(cls.__table__.c),
    "relationships": len(sa.inspect(cls).relationships),
}))
"""

AUTOMAP = (
    _PRELUDE
    + """\
import sqlalchemy as sa
from sqlalchemy.ext.automap import automap_base
from sqlalchemy.orm import configure_mappers
imported = time.perf_counter()
engine = sa.create_engine(sys.argv[1])
Base = automap_base()
Base.prepare(autoload_with=engine)
cls = getattr(Base.classes, sys.argv[2])
configure_mappers()
cls(name="x")
"""
    + _REPORT
)

REFLECT_ONE = (
    _PRELUDE
    + """\
import sqlalchemy as sa
from sqlalchemy.ext.automap import automap_base
imported = time.perf_counter()
engine = sa.create_engine(sys.argv[1])
metadata = sa.MetaData()
metadata.reflect(engine, only=[sys.argv[2]])
Base = automap_base(metadata=metadata)
Base.prepare()
cls = getattr(Base.classes, sys.argv[2])
cls(name="x")
"""
    + _REPORT
)

ONE_BY_ONE = (
    _PRELUDE
    + """\
import sqlalchemy as sa
from sqlalchemy.ext.automap import automap_base
from sqlalchemy.orm import configure_mappers
imported = time.perf_counter()
engine = sa.create_engine(sys.argv[1])
metadata = sa.MetaData()
with engine.connect() as connection:
    for name in sa.inspect(connection).get_table_names():
        sa.Table(name, metadata, autoload_with=connection)
Base = automap_base(metadata=metadata)
Base.prepare()
cls = getattr(Base.classes, sys.argv[2])
configure_mappers()
cls(name="x")
"""
    + _REPORT
)

DAEMON = (
    _PRELUDE
    + """\
import sqlalchemy as sa
from magenta_dynaconn import DatabaseRegistry
imported = time.perf_counter()
registry = DatabaseRegistry.connect(sys.argv[3], sys.argv[4])
cls = registry.get_db_instance(sys.argv[1], sys.argv[2])
cls(name="x")
"""
    + _REPORT
    + "registry.close()\n"
)

#: Variant name -> (child code, trials key).
VARIANTS = {
    "automap": AUTOMAP,
    "reflect one": REFLECT_ONE,
    "one by one": ONE_BY_ONE,
    "daemon": DAEMON,
}


@contextlib.contextmanager
def _database(backend: str, folder: str, count: int) -> Iterator[URL]:
    if backend == "sqlite":
        from sqlalchemy.engine import URL

        url = URL.create(
            "sqlite", database=os.path.join(folder, f"cold{count}.sqlite3")
        )
        create_schema(url, count)
        yield url
        return
    with server_database(PG_ADMIN) as url:
        create_schema(url, count)
        yield url


def _wait_cached(daemon: Daemon, section: str, count: int) -> None:
    """Wait until the daemon's schema of ``section`` has every table."""
    client = daemon.client()
    try:
        deadline = time.monotonic() + 300
        while len(client.tables(section)) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{section}: schema never cached")
            time.sleep(0.5)
    finally:
        client.close()


def _trials(sizes: Sizes, variant: str, count: int) -> int:
    return sizes.cold_trials.get(f"{variant}@{count}") or (
        sizes.cold_trials.get(variant, 5)
    )


def run(sizes: Sizes) -> list[Row]:
    """Run the cold-start comparison on every backend and table count."""
    rows: list[Row] = []
    for backend in sizes.backends:
        with scratch_folder("cold") as folder, contextlib.ExitStack() as stack:
            urls = {
                count: stack.enter_context(_database(backend, folder, count))
                for count in sizes.table_counts
            }
            ini = "".join(
                ini_section(f"cold{count}", url) for count, url in urls.items()
            )
            daemon = stack.enter_context(Daemon(folder, ini))
            daemon.wait_ready()
            for count in sizes.table_counts:
                _wait_cached(daemon, f"cold{count}", count)
            results = {
                count: _measure(sizes, daemon, urls[count], count)
                for count in sizes.table_counts
            }
        rows.extend(_rows(backend, sizes, results))
    return rows


def _measure(
    sizes: Sizes, daemon: Daemon, url: URL, count: int
) -> dict[str, list[dict[str, Any]]]:
    """Run every variant's trials for one table count, taking turns."""
    table = target_table(count)
    rendered = url.render_as_string(hide_password=False)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in VARIANTS}
    wanted = {name: _trials(sizes, name, count) for name in VARIANTS}
    for trial in range(max(wanted.values())):
        for name, code in VARIANTS.items():
            if trial >= wanted[name]:
                continue
            if name == "daemon":
                args = (f"cold{count}", table, daemon.socket, daemon.authkey)
            else:
                args = (rendered, table)
            outcome = fresh_process(code, *args)
            # A wrong class would make every figure meaningless.
            if (outcome["columns"], outcome["relationships"]) != (8, 1):
                raise RuntimeError(f"{name}: unexpected class {outcome}")
            results[name].append(outcome)
    return results


def _rows(
    backend: str,
    sizes: Sizes,
    results: dict[int, dict[str, list[dict[str, Any]]]],
) -> list[Row]:
    rows: list[Row] = []
    counts = sizes.table_counts
    largest, smallest = max(counts), min(counts)
    daemon_at = {
        count: statistics.median(t["total"] for t in results[count]["daemon"])
        for count in counts
    }
    for count in counts:
        medians = {
            name: statistics.median(t["total"] for t in trials)
            for name, trials in results[count].items()
        }
        for name, trials in results[count].items():
            totals = [t["total"] * 1000 for t in trials]
            works = [t["work"] * 1000 for t in trials]
            median, spread = summary(totals)
            ratio = medians[name] / medians["daemon"]
            goal, met = "", None
            if name == "automap" and count == largest:
                goal, met = "daemon >= 100x faster", ratio >= 100
            elif name == "reflect one":
                goal, met = "daemon faster", ratio > 1
            elif name == "daemon" and count == largest:
                flat = daemon_at[largest] / daemon_at[smallest]
                goal = f"flat within 25% of {smallest} tables"
                met = flat <= 1.25
                ratio = flat
            rows.append(
                Row(
                    comparison=f"1. cold start, {backend}",
                    variant=f"{name} @ {count} tables",
                    value=median,
                    unit="ms",
                    spread=spread,
                    trials=len(trials),
                    ratio=(
                        f"{ratio:.2f} (vs {smallest})"
                        if name == "daemon" and count == largest
                        else f"{ratio:.1f}x daemon"
                        if name != "daemon"
                        else ""
                    ),
                    goal=goal,
                    met=met,
                    note=f"after imports {statistics.median(works):.0f} ms",
                )
            )
    return rows
