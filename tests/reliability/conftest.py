"""Shared fixtures of the reliability suite: a daemon, a leak scan, counts.

``DaemonProcess`` runs the real ``dynaconnd`` as a subprocess with JSON
logs in a file and reads its events incrementally.  ``LEAKS`` collects
every text the suite captures (daemon logs, client logs, CLI output,
error messages) and fails the session if a planted password or any
daemon's authkey appears in one.  ``STATS`` feeds the summary line.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.parse
from typing import TYPE_CHECKING, Any

import psutil
import pytest
from sqlalchemy.engine import URL

from dynaconnd.server import read_authkey
from magenta_dynaconn import DatabaseRegistry
from tests.helpers import wait_for

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence
    from pathlib import Path

    from magenta_dynaconn._remote import RemoteRegistry

#: Passwords planted in bad files and databases; none may ever be shown.
PLANTED = "Xq7-planted-Pw-9d2e"
PLANTED_URL = "p@ss:w/rd#1%7d+Xq7"
PLANTED_SECRETS = (PLANTED, PLANTED_URL)

#: Start-up imports SQLAlchemy and friends: allow for a slow machine.
START_TIMEOUT = 30.0
STEP_TIMEOUT = 15.0

#: What the summary line counts, across the whole session.
STATS = {"corpus": 0, "faults": 0, "rows": 0, "rejected": 0}

# Variables a systemd unit sets that must not leak in from the runner.
_SYSTEMD_VARIABLES = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "RUNTIME_DIRECTORY",
    "STATE_DIRECTORY",
    "CREDENTIALS_DIRECTORY",
    "DYNACONN_SOCKET",
    "DYNACONN_AUTHKEY_FILE",
)


# -- the leak scan ------------------------------------------------------


def _forms(secret: str | bytes) -> set[bytes]:
    """Return the ways ``secret`` could show up in a captured text."""
    if isinstance(secret, bytes):
        texts = {
            secret.hex(),
            secret.hex().upper(),
            base64.b64encode(secret).decode(),
            repr(secret)[2:-1],
        }
        forms = {text.encode() for text in texts} | {secret}
        return {form.lower() for form in forms}
    texts = {
        secret,
        urllib.parse.quote(secret, safe=""),
        urllib.parse.quote_plus(secret),
        json.dumps(secret)[1:-1],
        repr(secret)[1:-1],
        _in_url(secret),
    }
    # Compared lowercased: a value may be folded before it is shown.
    return {text.encode().lower() for text in texts}


def _in_url(secret: str) -> str:
    """Return ``secret`` as SQLAlchemy writes it inside a URL."""
    url = URL.create("x", username="u", password=secret, host="h")
    rendered = url.render_as_string(hide_password=False)
    return rendered.split("://u:", 1)[1].rsplit("@h", 1)[0]


class LeakScan:
    """Every captured text, checked against every secret the suite knows."""

    def __init__(self, secrets: Sequence[str | bytes]) -> None:
        self.secrets: list[str | bytes] = list(secrets)
        self.texts: list[tuple[str, bytes]] = []

    def add_secret(self, secret: str | bytes) -> None:
        """Search every text for ``secret`` too (an authkey, say)."""
        if secret not in self.secrets:
            self.secrets.append(secret)

    def register(self, where: str, text: str | bytes) -> list[str]:
        """Keep ``text`` for the final scan; return what it leaks now."""
        data = (
            text.encode("utf-8", "replace") if isinstance(text, str) else text
        )
        self.texts.append((where, data))
        return self._hits(where, data)

    def hits(self) -> list[str]:
        """Return every (text, secret) pair that leaks, over all texts."""
        return [
            hit
            for where, data in self.texts
            for hit in self._hits(where, data)
        ]

    def _hits(self, where: str, data: bytes) -> list[str]:
        data = data.lower()
        found = []
        for number, secret in enumerate(self.secrets):
            if any(form in data for form in _forms(secret)):
                kind = "authkey" if isinstance(secret, bytes) else "password"
                found.append(f"{where}: {kind} #{number}")
        return found


LEAKS = LeakScan(PLANTED_SECRETS)


def assert_no_leak(where: str, text: str | bytes) -> None:
    """Register ``text`` with the leak scan and fail if it leaks now."""
    assert [] == LEAKS.register(where, text)


@pytest.fixture(scope="session", autouse=True)
def leak_scan() -> Iterator[LeakScan]:
    """Fail the session if any registered text held a secret."""
    yield LEAKS
    assert [] == LEAKS.hits()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print what the reliability suite tried, in one line."""
    if not LEAKS.texts and not any(STATS.values()):
        return
    terminalreporter.write_line(
        f"reliability: {STATS['corpus']} corpus files tried,"
        f" {STATS['faults']} faults injected,"
        f" {STATS['rows']} rows checked,"
        f" {STATS['rejected']} clients rejected;"
        f" {len(LEAKS.texts)} texts scanned for"
        f" {len(LEAKS.secrets)} secrets, {len(LEAKS.hits())} leaks"
    )


# -- files ----------------------------------------------------------------


def sqlite_section(folder: Path, name: str, **extra: str) -> str:
    """Create SQLite database ``name`` and return its source.ini section."""
    # Probes open the file read-only, so it must exist to be up.
    path = folder / f"{name}.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as connection:
        connection.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER)")
        connection.commit()
    lines = [f"[{name}]", "source = sqlite", f"base = {path}"]
    lines += [f"{key} = {value}" for key, value in extra.items()]
    return "\n".join(lines) + "\n\n"


def replace_file(path: Path, data: str | bytes) -> None:
    """Save ``data`` at ``path`` the way editors do: a temp file renamed."""
    temp = path.with_name(f".{path.name}.tmp")
    raw = data.encode() if isinstance(data, str) else data
    temp.write_bytes(raw)
    os.replace(temp, path)


# -- the daemon -------------------------------------------------------------


class DaemonProcess:
    """One ``dynaconnd`` subprocess (restartable) and its log events."""

    def __init__(
        self,
        folder: Path,
        *,
        config: Path,
        state_dir: Path | None = None,
        prefix: Sequence[str] = (),
        extra_args: Sequence[str] = (),
        environ: dict[str, str] | None = None,
    ) -> None:
        self.folder = folder
        self.config = config
        self.socket = str(folder / "run" / "dynaconnd.sock")
        self.authkey_file = str(folder / "run" / "authkey")
        self.state_dir = state_dir
        self.prefix = tuple(prefix)
        self.extra_args = tuple(extra_args)
        self.environ = environ or {}
        self.process: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []
        self.events: list[dict[str, Any]] = []
        self._offset = 0
        self._clients: list[RemoteRegistry] = []

    # -- life cycle ---------------------------------------------------

    def start(self) -> DaemonProcess:
        """Start (or restart) the daemon and wait for ``daemon.ready``."""
        argv = [
            *self.prefix,
            sys.executable,
            "-m",
            "dynaconnd",
            "--config",
            str(self.config),
            "--socket",
            self.socket,
            "--authkey-file",
            self.authkey_file,
            "--log-format",
            "json",
            "--debounce",
            "50ms",
            *self.extra_args,
        ]
        if self.state_dir is not None:
            argv += ["--state-dir", str(self.state_dir)]
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in _SYSTEMD_VARIABLES
        }
        env.update(self.environ)
        log = self.folder / f"daemon-{len(self.logs)}.log"
        self.logs.append(log)
        self.events = []
        self._offset = 0
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                argv,
                env=env,
                cwd=self.folder,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.wait_event("daemon.ready", timeout=START_TIMEOUT)
        LEAKS.add_secret(read_authkey(self.authkey_file))
        return self

    def kill(self, signum: int = signal.SIGKILL) -> int:
        """Send ``signum`` and wait for the process to end."""
        assert self.process is not None
        self.process.send_signal(signum)
        return self.process.wait(timeout=STEP_TIMEOUT)

    def stop(self) -> int | None:
        """Stop the daemon with SIGTERM (SIGKILL if it hangs)."""
        process = self.process
        if process is None or process.poll() is not None:
            return None if process is None else process.returncode
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=STEP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait(timeout=STEP_TIMEOUT)

    def close(self) -> None:
        """Close clients, stop the daemon, hand its logs to the scan."""
        for client in self._clients:
            client.close()
        self._clients.clear()
        self.stop()
        for log in self.logs:
            with contextlib.suppress(FileNotFoundError):
                LEAKS.register(f"daemon log {log}", log.read_bytes())

    @property
    def pid(self) -> int:
        """Return the process id of the running daemon."""
        assert self.process is not None
        return self.process.pid

    def rss(self) -> int:
        """Return the daemon's resident memory in bytes."""
        return int(psutil.Process(self.pid).memory_info().rss)

    def connect(self) -> RemoteRegistry:
        """Return a client of this daemon; closed with the daemon."""
        client: RemoteRegistry = DatabaseRegistry.connect(
            socket=self.socket, authkey_file=self.authkey_file
        )
        self._clients.append(client)
        return client

    # -- events -------------------------------------------------------

    def read_events(self) -> list[dict[str, Any]]:
        """Return the current run's JSON events, reading only new lines."""
        with open(self.logs[-1], "rb") as handle:
            handle.seek(self._offset)
            data = handle.read()
        end = data.rfind(b"\n") + 1
        self._offset += end
        for line in data[:end].splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    self.events.append(event)
        return self.events

    def mark(self) -> int:
        """Return the index the next event will have."""
        return len(self.read_events())

    def named(self, name: str, *, after: int = 0) -> list[dict[str, Any]]:
        """Return the events called ``name`` from index ``after`` on."""
        return [
            event
            for event in self.read_events()[after:]
            if event.get("event") == name
        ]

    def wait_event(
        self,
        name: str,
        *,
        after: int = 0,
        where: Callable[[dict[str, Any]], bool] = lambda event: True,
        timeout: float = STEP_TIMEOUT,
    ) -> tuple[int, dict[str, Any]]:
        """Return the first event ``name`` from ``after`` that fits."""

        def find() -> tuple[int, dict[str, Any]] | None:
            events = self.read_events()
            for index in range(after, len(events)):
                event = events[index]
                if event.get("event") == name and where(event):
                    return index, event
            self._fail_if_exited(name)
            return None

        found = wait_for(find, timeout=timeout, what=f"event {name}")
        assert found is not None
        return found

    def tail(self, lines: int = 30) -> str:
        """Return the end of the current log, for failure messages."""
        text = self.logs[-1].read_text(errors="replace")
        return "".join(text.splitlines(keepends=True)[-lines:])

    def _fail_if_exited(self, what: str) -> None:
        assert self.process is not None
        status = self.process.poll()
        if status is not None:
            self.read_events()
            pytest.fail(
                f"dynaconnd exited with status {status} while waiting for"
                f" {what}; output:\n{self.tail()}"
            )


class DaemonFactory:
    """Start daemons in one folder; stop them all on ``close()``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.daemons: list[DaemonProcess] = []

    def __call__(
        self,
        ini: str | bytes,
        *,
        name: str = "d",
        state_dir: Path | None = None,
        prefix: Sequence[str] = (),
        environ: dict[str, str] | None = None,
        start: bool = True,
    ) -> DaemonProcess:
        """Write ``ini`` as source.ini in a folder of its own; start."""
        folder = self.folder / name
        folder.mkdir(parents=True, exist_ok=True)
        config = folder / "source.ini"
        replace_file(config, ini)
        daemon = DaemonProcess(
            folder,
            config=config,
            state_dir=state_dir,
            prefix=prefix,
            environ=environ,
        )
        self.daemons.append(daemon)
        return daemon.start() if start else daemon

    def close(self) -> None:
        """Stop every daemon started here and scan its logs."""
        for daemon in self.daemons:
            daemon.close()


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[DaemonFactory]:
    """Yield a factory of daemons that are stopped after the test."""
    factory = DaemonFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.close()


def wait_until(
    predicate: Callable[[], object], *, timeout: float, what: str
) -> None:
    """``wait_for`` with a clearer name for conditions, not values."""
    wait_for(predicate, timeout=timeout, what=what)


def elapsed_since(started: float) -> float:
    """Return the seconds since the ``time.monotonic()`` ``started``."""
    return time.monotonic() - started
