"""Turn a ``DatabaseSpec`` into a SQLAlchemy engine, in one place.

The daemon, the embedded client and the daemon-backed client all build
engines here, so an identical spec gives an identically configured
engine wherever it is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

if TYPE_CHECKING:
    from dynaconnd.spec import DatabaseSpec

__all__ = ["build_engine", "engine_kwargs"]


def _connect_args(spec: DatabaseSpec) -> dict[str, Any]:
    timeout = spec.engine.connect_timeout
    if timeout is None:
        return {}
    backend = spec.backend
    if backend == "sqlite":
        # sqlite3's "timeout" is how long to wait for a lock, the nearest
        # thing a file database has to a connect timeout.
        return {"timeout": timeout}
    # psycopg and PyMySQL both take whole seconds; never round down to 0,
    # which means "wait forever" to libpq.
    return {"connect_timeout": max(1, round(timeout))}


def engine_kwargs(spec: DatabaseSpec) -> dict[str, Any]:
    """Return the keyword arguments ``create_engine`` gets for ``spec``."""
    options = spec.engine
    kwargs: dict[str, Any] = {
        "pool_pre_ping": options.pool_pre_ping,
        "echo": options.echo,
    }
    for key in ("pool_size", "max_overflow", "pool_recycle", "pool_timeout"):
        value = getattr(options, key)
        if value is not None:
            kwargs[key] = value
    connect_args = _connect_args(spec)
    if connect_args:
        kwargs["connect_args"] = connect_args
    return kwargs


def build_engine(spec: DatabaseSpec) -> sa.Engine:
    """Create the engine for ``spec``; no connection is opened yet."""
    return sa.create_engine(spec.url, **engine_kwargs(spec))
