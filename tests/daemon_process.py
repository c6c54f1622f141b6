"""dynaconnd as a subprocess of a test, with its JSON log at hand.

Used by the command-line, secrets and writes tests; the fixture kills
every daemon it started, whatever the test did.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import pytest

from magenta_dynaconn._remote import RemoteRegistry
from tests.helpers import wait_for

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping, Sequence
    from pathlib import Path

__all__ = ["DaemonProcess", "kill", "launch", "start_dynaconnd"]

#: Start-up imports SQLAlchemy and friends: allow for a slow machine.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0

# Variables a systemd unit sets that must not leak in from a test runner
# that itself runs under systemd.
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


class DaemonProcess:
    """One running dynaconnd and the paths it was started with."""

    def __init__(self, folder: Path, process: subprocess.Popen[bytes]):
        self.folder = folder
        self.process = process
        self.config = folder / "source.ini"
        self.socket = str(folder / "run" / "d.sock")
        self.authkey_file = str(folder / "run" / "key")
        self.log_path = folder / "daemon.log"

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """Return the daemon's log events so far, those called ``name``."""
        found = []
        with open(self.log_path, encoding="utf-8", errors="replace") as log:
            for line in log:
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if name is None or event.get("event") == name:
                        found.append(event)
        return found

    def wait_event(
        self,
        name: str,
        predicate: Callable[[dict[str, Any]], object] = bool,
        *,
        after: int = 0,
        timeout: float = 15.0,
    ) -> dict[str, Any]:
        """Wait for the first event ``name`` past index ``after`` that fits."""

        def find() -> dict[str, Any] | None:
            if self.process.poll() is not None:
                pytest.fail(
                    f"dynaconnd exited with {self.process.returncode}:\n"
                    + self.log_path.read_text(errors="replace")[-3000:]
                )
            for event in self.events(name)[after:]:
                if predicate(event):
                    return event
            return None

        found = wait_for(find, timeout=timeout, what=f"event {name}")
        assert found is not None
        return found

    def client(self) -> RemoteRegistry:
        """Return a client of this daemon; the caller closes it."""
        return RemoteRegistry(self.socket, self.authkey_file)

    def cli_argv(self, *argv: str) -> list[str]:
        """Return ``argv`` for ``dynaconn``, pointed at this daemon."""
        return [
            "--socket",
            self.socket,
            "--authkey-file",
            self.authkey_file,
            *argv,
        ]

    def stop(self) -> int:
        """Stop the daemon with SIGTERM; return its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=STOP_TIMEOUT)


def launch(
    home: Path,
    ini: str,
    *,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> DaemonProcess:
    """Start dynaconnd on ``ini`` in folder ``home``; the caller kills it."""
    home.mkdir(exist_ok=True)
    (home / "source.ini").write_text(ini)
    environ = {
        key: value
        for key, value in os.environ.items()
        if key not in _SYSTEMD_VARIABLES
    }
    environ.update(env or {})
    argv = [
        sys.executable,
        "-m",
        "dynaconnd",
        "--config",
        str(home / "source.ini"),
        "--socket",
        str(home / "run" / "d.sock"),
        "--authkey-file",
        str(home / "run" / "key"),
        "--log-format",
        "json",
        "--debounce",
        "50ms",
        *args,
    ]
    with open(home / "daemon.log", "wb") as log:
        process = subprocess.Popen(
            argv,
            env=environ,
            cwd=home,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return DaemonProcess(home, process)


def kill(daemon: DaemonProcess) -> None:
    """Kill ``daemon`` if it still runs, and reap it."""
    if daemon.process.poll() is None:
        daemon.process.kill()
    daemon.process.wait(timeout=STOP_TIMEOUT)


@pytest.fixture
def start_dynaconnd(
    tmp_path: Path,
) -> Iterator[Callable[..., DaemonProcess]]:
    """Yield a function that starts dynaconnd and waits until it serves."""
    started: list[DaemonProcess] = []

    def start(
        ini: str,
        *,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> DaemonProcess:
        home = tmp_path / f"daemon{len(started)}"
        daemon = launch(home, ini, args=args, env=env)
        started.append(daemon)
        daemon.wait_event("daemon.ready", timeout=START_TIMEOUT)
        return daemon

    try:
        yield start
    finally:
        for daemon in started:
            kill(daemon)
