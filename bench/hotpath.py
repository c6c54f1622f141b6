"""2. Hot path: ``new_session`` + ``SELECT 1`` + close, in one process.

Three variants on the same database, taking turns in rounds (in a new
random order each round) so that drift hits them all alike:

- ``bare``: ``Session(engine)`` on an engine from
  ``dynaconnd.engines.build_engine`` with the very same spec;
- ``embedded``: ``DatabaseRegistry(source).new_session(name)``;
- ``daemon``: ``DatabaseRegistry.connect().new_session(name)``.
"""

from __future__ import annotations

import os
import random
import sqlite3
import statistics
import time
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session

from bench._common import (
    PG_ADMIN,
    Daemon,
    Row,
    ini_section,
    scratch_folder,
    server_database,
    summary,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from bench._common import Sizes

__all__ = ["run"]

_SELECT_1 = sa.text("SELECT 1")


def _one_op(new_session: Callable[[], Session]) -> None:
    session = new_session()
    try:
        if session.execute(_SELECT_1).scalar() != 1:
            raise RuntimeError("SELECT 1 did not return 1")
    finally:
        session.close()


def _time_ops(new_session: Callable[[], Session], ops: int) -> float:
    """Return the mean seconds per operation over ``ops`` operations."""
    started = time.perf_counter()
    for _ in range(ops):
        _one_op(new_session)
    return (time.perf_counter() - started) / ops


def _url(backend: str, folder: str, stack: Any) -> URL:
    if backend == "sqlite":
        path = os.path.join(folder, "hot.sqlite3")
        sqlite3.connect(path).close()
        return URL.create("sqlite", database=path)
    url: URL = stack.enter_context(server_database(PG_ADMIN))
    return url


def _variants(
    engine: sa.Engine, embedded: Any, remote: Any
) -> dict[str, Callable[[], Session]]:
    return {
        "bare": lambda: Session(engine),
        "embedded": lambda: embedded.new_session("hot"),
        "daemon": lambda: remote.new_session("hot"),
    }


def run(sizes: Sizes) -> list[Row]:
    """Compare the three variants on every backend."""
    import contextlib

    from dynaconnd.config import load_config
    from dynaconnd.engines import build_engine
    from magenta_dynaconn import DatabaseRegistry

    rows: list[Row] = []
    for backend in sizes.backends:
        with scratch_folder("hot") as folder, contextlib.ExitStack() as stack:
            url = _url(backend, folder, stack)
            ini = ini_section("hot", url)
            daemon = stack.enter_context(Daemon(folder, ini))
            daemon.wait_ready()
            spec = load_config(daemon.config).specs["hot"]
            engine = build_engine(spec)
            stack.callback(engine.dispose)
            embedded = DatabaseRegistry(daemon.config)
            stack.callback(embedded.close)
            remote = daemon.client()
            stack.callback(remote.close)
            variants = _variants(engine, embedded, remote)

            # Warm every pool and code path before timing anything.
            for new_session in variants.values():
                _time_ops(new_session, 20)
            samples: dict[str, list[float]] = {name: [] for name in variants}
            order = list(variants)
            for _ in range(sizes.hot_rounds):
                random.shuffle(order)
                for name in order:
                    samples[name].append(
                        _time_ops(variants[name], sizes.hot_ops)
                    )
        rows.extend(_rows(backend, sizes, samples))
    return rows


def _rows(
    backend: str, sizes: Sizes, samples: dict[str, list[float]]
) -> list[Row]:
    bare = statistics.median(samples["bare"])
    rows = []
    for name, values in samples.items():
        micros = [value * 1e6 for value in values]
        median, spread = summary(micros)
        ratio = statistics.median(values) / bare
        is_client = name != "bare"
        rows.append(
            Row(
                comparison=f"2. hot path, {backend}",
                variant=name,
                value=median,
                unit="us/op",
                spread=spread,
                trials=len(values),
                ratio=f"{ratio:.3f}x bare",
                goal="<= 1.05x bare" if is_client else "",
                met=ratio <= 1.05 if is_client else None,
                note=f"{sizes.hot_ops} ops per round",
            )
        )
    return rows
