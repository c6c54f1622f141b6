"""Client processes that write through ``DatabaseRegistry.connect()``.

Each ``Writer`` is a spawned process: it connects to the daemon, then
inserts ``(worker, seq)`` rows into ``ledger`` one transaction at a
time, counting what committed, what failed before the commit and what
failed in the commit itself (in doubt: the server may have committed).
Its counts travel back in a JSON file; its progress in shared memory,
so a test can wait for every client to commit again after a fault.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from multiprocessing.sharedctypes import Synchronized
    from multiprocessing.synchronize import Event
    from pathlib import Path

__all__ = ["LEDGER_DDL", "Writer", "WriterResult"]

#: The table every writer inserts into.
LEDGER_DDL = (
    "CREATE TABLE ledger (worker INTEGER NOT NULL, seq INTEGER NOT NULL,"
    " PRIMARY KEY (worker, seq))"
)

#: A failed transaction waits this long before the next, so a client of
#: a dead database does not spin.
_PAUSE = 0.05

WriterResult = dict[str, Any]


def _run(
    socket: str,
    authkey_file: str,
    database: str,
    worker: int,
    stop: Event,
    progress: Synchronized[int],
    seen: Synchronized[int],
    watch_name: str,
    out: str,
    log: str,
) -> None:
    """Write rows until ``stop`` is set; dump the counts to ``out``."""
    import sqlalchemy as sa

    from dynaconnd.errors import DynaconnError
    from dynaconnd.logs import configure_logging
    from magenta_dynaconn import DatabaseRegistry

    with open(log, "a", encoding="utf-8") as stream:
        configure_logging(fmt="json", level="debug", stream=stream)
        registry = DatabaseRegistry.connect(
            socket=socket, authkey_file=authkey_file
        )
        committed: list[int] = []
        in_doubt: list[int] = []
        failures: dict[str, int] = {}
        seq = 0
        insert = sa.text("INSERT INTO ledger (worker, seq) VALUES (:w, :s)")
        while not stop.is_set():
            seq += 1
            stage = "begin"
            try:
                session = registry.new_session(database)
                try:
                    session.execute(insert, {"w": worker, "s": seq})
                    stage = "commit"
                    session.commit()
                finally:
                    with contextlib.suppress(sa.exc.SQLAlchemyError, OSError):
                        session.close()
            except (sa.exc.SQLAlchemyError, OSError, DynaconnError) as error:
                name = f"{stage}:{error.__class__.__name__}"
                failures[name] = failures.get(name, 0) + 1
                if stage == "commit":
                    in_doubt.append(seq)
                stop.wait(_PAUSE)
            else:
                committed.append(seq)
                progress.value = len(committed)
            if watch_name and not seen.value:
                with contextlib.suppress(DynaconnError, OSError):
                    seen.value = int(watch_name in registry.list_names())
        registry.close()
    with open(out, "w", encoding="utf-8") as handle:
        json.dump(
            {
                "worker": worker,
                "committed": committed,
                "in_doubt": in_doubt,
                "failures": failures,
            },
            handle,
        )


class Writer:
    """One spawned client process and what it reports."""

    def __init__(
        self,
        folder: Path,
        *,
        socket: str,
        authkey_file: str,
        database: str,
        worker: int,
        watch_name: str = "",
    ) -> None:
        context = multiprocessing.get_context("spawn")
        self.worker = worker
        self.out = folder / f"writer-{worker}.json"
        self.log = folder / f"writer-{worker}.log"
        self.stop_event = context.Event()
        self.progress: Synchronized[int] = context.Value("i", 0)
        self.seen: Synchronized[int] = context.Value("i", 0)
        self.process = context.Process(
            target=_run,
            args=(
                socket,
                authkey_file,
                database,
                worker,
                self.stop_event,
                self.progress,
                self.seen,
                watch_name,
                str(self.out),
                str(self.log),
            ),
            name=f"writer-{worker}",
        )

    @property
    def committed(self) -> int:
        """Return how many transactions this writer has committed so far."""
        return int(self.progress.value)

    def start(self) -> Writer:
        """Start the process."""
        self.process.start()
        return self

    def finish(self, timeout: float = 30.0) -> WriterResult:
        """Stop the writer and return its counts."""
        self.stop_event.set()
        self.process.join(timeout)
        assert 0 == self.process.exitcode, self.log.read_text()
        result: WriterResult = json.loads(self.out.read_text())
        return result

    def kill(self) -> None:
        """Kill the process if it still runs (for ``finally``)."""
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)

    def log_events(self) -> list[dict[str, Any]]:
        """Return the client's own log events."""
        events = []
        if self.log.exists():
            for line in self.log.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    events.append(json.loads(line))
        return events
