"""Shared fixtures of the reliability suite: a daemon, a leak scan, counts.

``DaemonProcess`` is the shared harness's daemon (tests/daemon_harness.py)
with this suite's event API.  ``LEAKS`` collects every text the suite
captures (daemon output, client logs, CLI output, error messages) and
fails the session if a planted password or any daemon's authkey appears
in one.  ``STATS`` feeds the summary line.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import time
import urllib.parse
from typing import TYPE_CHECKING, Any

import psutil
import pytest
from sqlalchemy.engine import URL

from dynaconnd.server import read_authkey
from magenta_dynaconn import DatabaseRegistry
from tests import daemon_harness as harness
from tests.daemon_harness import START_TIMEOUT, STEP_TIMEOUT, clean_environment
from tests.helpers import wait_for

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence
    from pathlib import Path

    from magenta_dynaconn._remote import RemoteRegistry

#: Passwords planted in bad files and databases; none may ever be shown.
PLANTED = "Xq7-planted-Pw-9d2e"
PLANTED_URL = "p@ss:w/rd#1%7d+Xq7"
PLANTED_SECRETS = (PLANTED, PLANTED_URL)

#: What the summary line counts, across the whole session.
STATS = {"corpus": 0, "faults": 0, "rows": 0, "rejected": 0}

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


class DaemonProcess(harness.DaemonProcess):
    """The harness's daemon in this suite's terms, its output leak-scanned.

    Events are indexed over every run of the daemon, as ``mark()``
    counts them; ``wait_event`` takes a ``where`` predicate and returns
    the index with the event.  ``close()`` stops the daemon with SIGTERM,
    so that its shutdown is scanned too, then hands its output to
    ``LEAKS``; each start adds the new authkey to the secrets.
    """

    def __init__(
        self,
        folder: Path,
        *,
        config: Path,
        state_dir: Path | None = None,
        prefix: Sequence[str] = (),
        environ: dict[str, str] | None = None,
    ) -> None:
        super().__init__(
            folder,
            config=config,
            args=["--debounce", "50ms"],
            prefix=prefix,
            state_dir=state_dir,
            env=clean_environment(**(environ or {})),
        )
        self._connected: list[RemoteRegistry] = []

    # -- life cycle ---------------------------------------------------

    def start(
        self, *, wait_ready: bool = True, timeout: float = START_TIMEOUT
    ) -> DaemonProcess:
        """Start (or restart) the daemon; scan for its authkey from now."""
        super().start(wait_ready=wait_ready, timeout=timeout)
        if wait_ready:
            LEAKS.add_secret(read_authkey(self.authkey_file))
        return self

    def kill(self, signum: int = signal.SIGKILL) -> int:
        """Send ``signum`` and wait for the process to end."""
        return self.stop(signum, timeout=STEP_TIMEOUT)

    def close(self) -> None:
        """Close clients, stop the daemon, hand its output to the scan."""
        for client in self._connected:
            client.close()
        self._connected.clear()
        if self.process is not None and self.is_running():
            self.send_signal(signal.SIGTERM)
            # A daemon that hangs is killed by DaemonProcess.close().
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=STEP_TIMEOUT)
        super().close()
        LEAKS.register(f"daemon output {self.folder}", self.output())

    def rss(self) -> int:
        """Return the daemon's resident memory in bytes."""
        return int(psutil.Process(self.pid).memory_info().rss)

    def connect(self) -> RemoteRegistry:
        """Return a client of this daemon; closed with the daemon."""
        client: RemoteRegistry = DatabaseRegistry.connect(
            socket=self.socket, authkey_file=self.authkey_file
        )
        self._connected.append(client)
        return client

    # -- events -------------------------------------------------------

    def read_events(self) -> list[dict[str, Any]]:
        """Return every JSON event the daemon has logged so far."""
        return self.events()

    def named(self, name: str, *, after: int = 0) -> list[dict[str, Any]]:
        """Return the events called ``name`` from index ``after`` on."""
        return self.events(name, after=after)

    def wait_event(  # type: ignore[override]
        self,
        name: str,
        *,
        after: int = 0,
        where: Callable[[dict[str, Any]], bool] = lambda event: True,
        timeout: float = STEP_TIMEOUT,
    ) -> tuple[int, dict[str, Any]]:
        """Return the first event ``name`` from ``after`` that fits."""

        def find() -> tuple[int, dict[str, Any]] | None:
            # Once the process is gone, read its output to the end
            # before deciding that the event never came.
            exited = not self.is_running()
            if exited:
                self.wait_exit()
            events = self.read_events()
            for index in range(after, len(events)):
                event = events[index]
                if event.get("event") == name and where(event):
                    return index, event
            if exited:
                self._fail_if_exited(name)
            return None

        found = wait_for(find, timeout=timeout, what=f"event {name}")
        assert found is not None
        return found

    def _fail_if_exited(self, what: str) -> None:
        status = None if self.process is None else self.process.poll()
        if status is not None:
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
