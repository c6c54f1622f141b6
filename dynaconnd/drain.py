"""Retire replaced engines once the connections they lent out are back."""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import TYPE_CHECKING

from dynaconnd.logs import get_logger

if TYPE_CHECKING:
    import sqlalchemy as sa

__all__ = ["EngineDrainer"]

log = get_logger("drain")


@dataclasses.dataclass
class _Retiree:
    name: str
    engine: sa.Engine
    deadline: float


def _checked_out(engine: sa.Engine) -> int:
    # Only QueuePool-like pools count loans; others (NullPool,
    # SingletonThreadPool) hold nothing worth waiting for.
    counter = getattr(engine.pool, "checkedout", None)
    return int(counter()) if callable(counter) else 0


class EngineDrainer:
    """Dispose engines when idle, or at their drain deadline at the latest.

    A thread named ``dynaconn-drain`` runs only while there is something
    to drain, so an idle registry holds no thread.
    """

    def __init__(
        self, *, timeout: float = 30.0, poll_interval: float = 0.1
    ) -> None:
        self.timeout = timeout
        self.poll_interval = poll_interval
        self._retirees: list[_Retiree] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._should_exit = False

    def retire(self, name: str, engine: sa.Engine) -> None:
        """Schedule ``engine`` for disposal once nothing borrows from it."""
        deadline = time.monotonic() + self.timeout
        with self._lock:
            self._retirees.append(_Retiree(name, engine, deadline))
            if self._thread is None or not self._thread.is_alive():
                self._should_exit = False
                self._thread = threading.Thread(
                    target=self._run, name="dynaconn-drain", daemon=True
                )
                self._thread.start()
        self._wake.set()

    @property
    def pending(self) -> int:
        """Return how many engines wait to be disposed."""
        with self._lock:
            return len(self._retirees)

    def sweep(self) -> int:
        """Dispose every retiree that is idle or overdue; return the count."""
        now = time.monotonic()
        with self._lock:
            due = [
                retiree
                for retiree in self._retirees
                if now >= retiree.deadline or not _checked_out(retiree.engine)
            ]
            for retiree in due:
                self._retirees.remove(retiree)
        for retiree in due:
            busy = _checked_out(retiree.engine)
            retiree.engine.dispose()
            log.info(
                "engine.disposed",
                database=retiree.name,
                forced=bool(busy),
                checked_out=busy,
            )
        return len(due)

    def close(self) -> None:
        """Dispose everything still pending now and stop the thread."""
        with self._lock:
            self._should_exit = True
            for retiree in self._retirees:
                retiree.deadline = 0.0
        self._wake.set()
        thread = self._thread
        if thread is not None:
            thread.join()
        self.sweep()

    def _run(self) -> None:
        while True:
            self.sweep()
            with self._lock:
                if not self._retirees or self._should_exit:
                    self._thread = None
                    return
            self._wake.wait(self.poll_interval)
            self._wake.clear()
