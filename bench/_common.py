"""What every comparison shares: result rows, statistics, subprocesses."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import URL

from dynaconnd.editing import render_section, url_values

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

__all__ = [
    "MYSQL_ADMIN",
    "PG_ADMIN",
    "Daemon",
    "Row",
    "Sizes",
    "fresh_process",
    "ini_section",
    "percentile",
    "server_database",
    "spread",
    "summary",
    "unique_name",
]

PG_ADMIN = URL.create(
    "postgresql+psycopg",
    username="postgres",
    host="127.0.0.1",
    port=5432,
    database="postgres",
)
MYSQL_ADMIN = URL.create(
    "mysql+pymysql", username="root", host="127.0.0.1", port=3306
)

#: Variables a systemd unit or the caller's shell could leak in.
_DAEMON_ENV_DROP = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "RUNTIME_DIRECTORY",
    "STATE_DIRECTORY",
    "CREDENTIALS_DIRECTORY",
    "DYNACONN_SOCKET",
    "DYNACONN_AUTHKEY_FILE",
)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How big each comparison runs: the full bench or the test's."""

    quick: bool
    table_counts: tuple[int, ...] = (50, 500, 2000)
    cold_trials: dict[str, int] = dataclasses.field(default_factory=dict)
    hot_rounds: int = 15
    hot_ops: int = 200
    reload_trials: int = 100
    apply_sections: int = 1000
    apply_trials: int = 20
    socket_rounds: int = 15
    socket_calls: int = 200
    throughput_clients: int = 8
    throughput_seconds: float = 3.0
    scale_databases: int = 1000
    scale_unreachable: int = 100
    scale_warmup: float = 25.0
    scale_window: float = 60.0
    scale_interval: float = 10.0
    lateness_window: float = 45.0
    load_clients: int = 16
    load_rewrites: int = 500
    backends: tuple[str, ...] = ("postgresql", "sqlite")


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the results table."""

    comparison: str
    variant: str
    value: float
    unit: str
    spread: str = ""
    trials: int = 0
    ratio: str = ""
    goal: str = ""
    met: bool | None = None
    note: str = ""


def percentile(values: Sequence[float], fraction: float) -> float:
    """Return the ``fraction`` quantile of ``values``, interpolated."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = fraction * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def spread(values: Sequence[float], *, digits: int = 1) -> str:
    """Return the p10-p90 range of ``values`` as text."""
    low = percentile(values, 0.1)
    high = percentile(values, 0.9)
    return f"{low:.{digits}f}-{high:.{digits}f}"


def summary(values: Sequence[float]) -> tuple[float, str]:
    """Return the median and the p10-p90 spread of ``values``."""
    digits = 3 if statistics.median(values) < 1 else 1
    return statistics.median(values), spread(values, digits=digits)


def unique_name(prefix: str = "bench") -> str:
    """Return a database name that no other run uses."""
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


@contextlib.contextmanager
def server_database(admin: URL) -> Iterator[URL]:
    """Create a uniquely named database on ``admin``'s server; drop it."""
    engine = sa.create_engine(
        admin, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool
    )
    name = unique_name()
    quote = '"' if admin.get_backend_name() == "postgresql" else "`"
    force = " WITH (FORCE)" if quote == '"' else ""
    with engine.connect() as connection:
        connection.execute(sa.text(f"CREATE DATABASE {quote}{name}{quote}"))
    try:
        yield admin.set(database=name)
    finally:
        with engine.connect() as connection:
            connection.execute(
                sa.text(f"DROP DATABASE IF EXISTS {quote}{name}{quote}{force}")
            )
        engine.dispose()


def ini_section(name: str, url: URL, **extra: str | int | None) -> str:
    """Render the source.ini section ``name`` pointing at ``url``."""
    return render_section(name, {**url_values(url), **extra}) + "\n"


def _python_env() -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in _DAEMON_ENV_DROP
    }
    # The children import bench helpers and the project from this tree.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(
        [root, os.path.join(root, "client"), env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    return env


def fresh_process(code: str, *args: str, timeout: float = 600.0) -> Any:
    """Run ``code`` in a new interpreter; return the JSON it prints last.

    The child gets ``args`` as ``sys.argv[1:]``.
    """
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        env=_python_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"benchmark child failed with status {result.returncode}:\n"
            + result.stderr[-3000:]
        )
    return json.loads(result.stdout.strip().splitlines()[-1])


def spawn(code: str, *args: str) -> subprocess.Popen[str]:
    """Start ``code`` in a new interpreter with piped output."""
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        env=_python_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


class Daemon:
    """A dynaconnd subprocess in a folder of its own."""

    def __init__(
        self,
        folder: str,
        ini: str,
        *,
        debounce: str = "150ms",
        log_level: str = "info",
        extra: Sequence[str] = (),
    ) -> None:
        self.folder = folder
        self.config = os.path.join(folder, "source.ini")
        self.socket = os.path.join(folder, "run", "d.sock")
        self.authkey = os.path.join(folder, "run", "authkey")
        self.log_path = os.path.join(folder, "daemon.log")
        self.debounce = debounce
        with open(self.config, "w", encoding="utf-8") as handle:
            handle.write(ini)
        argv = [
            sys.executable,
            "-m",
            "dynaconnd",
            "--config",
            self.config,
            "--socket",
            self.socket,
            "--authkey-file",
            self.authkey,
            "--state-dir",
            os.path.join(folder, "state"),
            "--log-format",
            "json",
            "--log-level",
            log_level,
            "--debounce",
            debounce,
            *extra,
        ]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                argv,
                env=_python_env(),
                cwd=folder,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    @property
    def pid(self) -> int:
        """Return the daemon's process id."""
        return self.process.pid

    def events(self) -> list[dict[str, Any]]:
        """Return the daemon's JSON log events so far."""
        found = []
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    found.append(json.loads(line))
        return found

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait for ``daemon.ready``; raise with the log tail otherwise."""
        self.wait_event(
            lambda event: event.get("event") == "daemon.ready",
            timeout=timeout,
            what="daemon.ready",
        )

    def wait_event(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        *,
        timeout: float,
        what: str,
    ) -> dict[str, Any]:
        """Return the first log event that fits ``predicate``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            for event in self.events():
                if predicate(event):
                    return event
            time.sleep(0.1)
        raise RuntimeError(
            f"dynaconnd gave no {what} (status {self.process.poll()}):\n"
            + self.tail()
        )

    def tail(self, lines: int = 20) -> str:
        """Return the end of the daemon's output."""
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])

    def client(self) -> Any:
        """Return a ``RemoteRegistry`` connected to this daemon."""
        from magenta_dynaconn import DatabaseRegistry

        return DatabaseRegistry.connect(self.socket, self.authkey)

    def stop(self) -> None:
        """Stop the daemon with SIGTERM; kill it if it lingers."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@contextlib.contextmanager
def scratch_folder(prefix: str) -> Iterator[str]:
    """Yield a temporary folder, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=f"dynbench-{prefix}-") as path:
        yield path
