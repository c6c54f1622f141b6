"""6. Reload under load: clients commit while source.ini keeps changing.

Client processes commit one-row transactions on PostgreSQL through
``DatabaseRegistry.connect()`` while this process rewrites source.ini,
changing the very database they use (``pool_recycle``, so each save is
a new spec and a new engine in the daemon and in every client) and
back.  Each save waits until the daemon's generation moves, so every
one is a real reload.  Afterwards the rows the clients counted as
committed must equal the rows in the table, with no failure.
"""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING

import sqlalchemy as sa

from bench._common import (
    PG_ADMIN,
    Daemon,
    Row,
    ini_section,
    scratch_folder,
    server_database,
    spawn,
)

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

    from bench._common import Sizes

__all__ = ["DEBOUNCE", "run"]

#: A short quiet window, so that many reloads fit in the run.
DEBOUNCE = "50ms"

_CLIENT = """\
import json, os, sys, time
import sqlalchemy as sa
from magenta_dynaconn import DatabaseRegistry

socket_path, keyfile, stop_file, me = sys.argv[1:5]
registry = DatabaseRegistry.connect(socket_path, keyfile)
insert = sa.text("INSERT INTO ledger (client, n) VALUES (:client, :n)")
committed = failed = 0
errors = []
with registry.session_scope("load") as session:
    session.execute(sa.text("SELECT 1"))
print("ready", flush=True)
while not os.path.exists(stop_file):
    try:
        with registry.session_scope("load") as session:
            session.execute(insert, {"client": int(me), "n": committed})
    except Exception as error:
        failed += 1
        if len(errors) < 5:
            errors.append(f"{type(error).__name__}: {error}"[:300])
    else:
        committed += 1
registry.close()
print(json.dumps({"committed": committed, "failed": failed, "errors": errors}))
"""


def _ini(url: URL, variant: int) -> str:
    return ini_section("load", url, pool_recycle=3600 + variant)


def run(sizes: Sizes) -> list[Row]:
    """Run the clients through the rewrites and check every commit."""
    with server_database(PG_ADMIN) as url, scratch_folder("load") as folder:
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        with engine.begin() as connection:
            connection.execute(
                sa.text(
                    "CREATE TABLE ledger (id SERIAL PRIMARY KEY,"
                    " client INTEGER NOT NULL, n INTEGER NOT NULL)"
                )
            )
        stop_file = os.path.join(folder, "stop")
        with Daemon(folder, _ini(url, 0), debounce=DEBOUNCE) as daemon:
            daemon.wait_ready()
            clients = [
                spawn(
                    _CLIENT, daemon.socket, daemon.authkey, stop_file, str(i)
                )
                for i in range(sizes.load_clients)
            ]
            try:
                # Rewrites start once every client is under way.
                for child in clients:
                    if child.stdout is None or "ready" not in (
                        child.stdout.readline()
                    ):
                        raise RuntimeError("a load client did not start")
                watcher = daemon.client()
                try:
                    reloads, seconds = _rewrite(sizes, daemon, watcher, url)
                finally:
                    watcher.close()
            finally:
                with open(stop_file, "w", encoding="utf-8"):
                    pass
                results = []
                for child in clients:
                    out, err = child.communicate(timeout=120)
                    if child.returncode != 0:
                        raise RuntimeError(
                            f"load client failed:\n{err[-2000:]}"
                        )
                    results.append(json.loads(out.strip().splitlines()[-1]))
        with engine.connect() as connection:
            rows = connection.execute(
                sa.text("SELECT count(*) FROM ledger")
            ).scalar_one()
        engine.dispose()
    committed = sum(result["committed"] for result in results)
    failed = sum(result["failed"] for result in results)
    errors = [error for result in results for error in result["errors"]]
    lost = committed - rows
    return [
        Row(
            comparison="6. reload under load",
            variant=f"{sizes.load_clients} clients, {reloads} reloads:"
            " failed transactions",
            value=failed,
            unit="transactions",
            trials=committed + failed,
            goal="0 failed",
            met=failed == 0,
            note="; ".join(errors[:2]),
        ),
        Row(
            comparison="6. reload under load",
            variant="commits counted by clients - rows in the table",
            value=lost,
            unit="rows",
            trials=committed,
            goal="0 lost",
            met=lost == 0,
            note=f"{committed} committed, {rows} rows, {seconds:.0f} s,"
            f" {committed / seconds:.0f} commits/s, debounce {DEBOUNCE}",
        ),
    ]


def _rewrite(
    sizes: Sizes, daemon: Daemon, watcher: object, url: URL
) -> tuple[int, float]:
    """Save source.ini ``load_rewrites`` times; return reloads, seconds."""
    started = time.monotonic()
    reloads = 0
    for rewrite in range(sizes.load_rewrites):
        before = watcher.generation  # type: ignore[attr-defined]
        temporary = daemon.config + ".new"
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(_ini(url, (rewrite + 1) % 2))
        os.replace(temporary, daemon.config)
        deadline = time.monotonic() + 10
        while watcher.generation == before:  # type: ignore[attr-defined]
            if time.monotonic() > deadline:
                raise RuntimeError(
                    "a save was never applied:\n" + daemon.tail()
                )
            time.sleep(0.002)
        reloads += 1
    return reloads, time.monotonic() - started
