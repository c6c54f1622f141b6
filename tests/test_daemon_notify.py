"""The real daemon, in a subprocess, speaking sd_notify to a test socket."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

import pytest

from tests.helpers import wait_for

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

#: systemd would kill the daemon after this long without WATCHDOG=1.
WATCHDOG_USEC = 400_000

#: Start-up imports SQLAlchemy and friends: allow for a slow machine.
START_TIMEOUT = 30.0
STEP_TIMEOUT = 15.0

READY = re.compile(rb"READY=1\nSTATUS=([0-9]+)/([0-9]+) databases up")
RELOADING = re.compile(rb"RELOADING=1\nMONOTONIC_USEC=([0-9]+)")

# Variables a systemd unit would set that must not leak in from a test
# runner that itself runs under systemd.
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

# Runs the daemon as the kernel's MemoryDenyWriteExecute would: no
# mapping may become writable and executable, nor gain exec later.
_UNDER_MDWE = """\
import ctypes, runpy, sys
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
    sys.exit(77)
sys.argv = sys.argv[1:]
runpy.run_module("dynaconnd", run_name="__main__", alter_sys=True)
"""
_NO_MDWE = 77


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class RunningDaemon:
    """A dynaconnd subprocess and the datagrams it has sent so far."""

    def __init__(
        self, process: subprocess.Popen[bytes], listener: socket.socket
    ) -> None:
        self.process = process
        self.listener = listener
        self.log_path = ""
        self.messages: list[bytes] = []

    def drain(self) -> list[bytes]:
        """Read every datagram waiting on the socket; return them all."""
        while True:
            try:
                self.messages.append(self.listener.recv(4096))
            except BlockingIOError:
                return self.messages

    def log_events(self) -> list[dict[str, Any]]:
        """Return the daemon's JSON log lines parsed, skipping any other."""
        events = []
        with open(self.log_path, encoding="utf-8") as handle:
            for line in handle:
                with contextlib.suppress(ValueError):
                    events.append(json.loads(line))
        return events

    def log_tail(self, lines: int = 30) -> str:
        """Return the end of the daemon's output, for failure messages."""
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])

    def wait_message(
        self,
        predicate: Callable[[bytes], object],
        *,
        after: int = 0,
        what: str,
        timeout: float = STEP_TIMEOUT,
    ) -> int:
        """Return the index of the first message from ``after`` that fits."""

        def find() -> int | None:
            self._fail_if_exited(what)
            for index in range(after, len(self.drain())):
                if predicate(self.messages[index]):
                    # Index 0 is falsy; wait_for needs a truthy value.
                    return index + 1
            return None

        found = wait_for(find, timeout=timeout, what=what)
        assert found is not None
        return found - 1

    def _fail_if_exited(self, what: str) -> None:
        status = self.process.poll()
        if status is not None:
            pytest.fail(
                f"dynaconnd exited with status {status} while waiting for"
                f" {what}; messages {self.messages!r}; output:\n"
                + self.log_tail()
            )


def _sqlite_section(tmp_path: Path, name: str) -> str:
    """Create SQLite database ``name`` and return its source.ini section."""
    # Probes open the file read-only, so it must exist to be up.
    path = tmp_path / f"{name}.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as connection:
        connection.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER)")
        connection.commit()
    return (
        f"[{name}]\nsource = sqlite\nbase = {tmp_path / name}.sqlite3\n"
        "health_interval = 1s\n\n"
    )


@pytest.fixture
def start_daemon(
    tmp_path: Path,
) -> Iterator[Callable[..., RunningDaemon]]:
    """Yield a function that starts dynaconnd; kill it afterwards."""
    started: list[RunningDaemon] = []
    sockets: list[socket.socket] = []

    def start(*, ini: str, prefix: tuple[str, ...] = ("-m",)) -> RunningDaemon:
        config = tmp_path / "source.ini"
        config.write_text(ini)
        notify_path = tmp_path / "notify"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sockets.append(listener)
        listener.bind(str(notify_path))
        listener.setblocking(False)

        env = {
            key: value
            for key, value in os.environ.items()
            if key not in _SYSTEMD_VARIABLES
        }
        env["NOTIFY_SOCKET"] = str(notify_path)
        env["WATCHDOG_USEC"] = str(WATCHDOG_USEC)
        argv = [
            sys.executable,
            *prefix,
            "dynaconnd",
            "--config",
            str(config),
            "--socket",
            str(tmp_path / "d.sock"),
            "--authkey-file",
            str(tmp_path / "key"),
            "--log-format",
            "json",
        ]
        log_path = tmp_path / "daemon.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                argv,
                env=env,
                cwd=tmp_path,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        daemon = RunningDaemon(process, listener)
        daemon.log_path = str(log_path)
        started.append(daemon)
        return daemon

    try:
        yield start
    finally:
        for daemon in started:
            if daemon.process.poll() is None:
                daemon.process.kill()
            daemon.process.wait(timeout=STEP_TIMEOUT)
        for listener in sockets:
            listener.close()


@pytest.fixture
def daemon(
    tmp_path: Path, start_daemon: Callable[..., RunningDaemon]
) -> RunningDaemon:
    """Start dynaconnd on one SQLite database and wait for READY=1."""
    running = start_daemon(ini=_sqlite_section(tmp_path, "main"))
    running.wait_message(
        READY.fullmatch, what="READY=1", timeout=START_TIMEOUT
    )
    return running


def _stop(daemon: RunningDaemon) -> int:
    daemon.process.send_signal(signal.SIGTERM)
    return daemon.process.wait(timeout=STEP_TIMEOUT)


def test_daemon_sends_ready_with_database_count(
    daemon: RunningDaemon,
) -> None:
    """READY=1 carries an "N/M databases up" status for the 1 database."""
    ready = daemon.wait_message(READY.fullmatch, what="READY=1")

    match = READY.fullmatch(daemon.messages[ready])
    assert match is not None
    assert b"1" == match[2]


def test_daemon_sends_ready_once_after_the_socket_is_served(
    daemon: RunningDaemon, tmp_path: Path
) -> None:
    """Start-up sends one READY=1, no RELOADING=1, and serves first."""
    assert (tmp_path / "d.sock").exists()

    # The first watchdog ping comes from the main loop, after start-up.
    first_ping = daemon.wait_message(
        lambda message: message == b"WATCHDOG=1", what="WATCHDOG=1"
    )
    start_up = daemon.messages[:first_ping]

    # systemd takes the first READY=1 as "started" and lets units ordered
    # after this one start: it must not come before the socket is served.
    assert (1, 0) == (
        sum(1 for message in start_up if message.startswith(b"READY=1")),
        sum(1 for message in start_up if message.startswith(b"RELOADING=")),
    ), f"start-up sent {start_up!r}"


def test_daemon_status_follows_health(daemon: RunningDaemon) -> None:
    """STATUS= reports the database up once its first probe succeeds."""
    daemon.wait_message(
        lambda message: b"STATUS=1/1 databases up" in message,
        what="STATUS=1/1 databases up",
    )


def test_daemon_feeds_the_watchdog_repeatedly(daemon: RunningDaemon) -> None:
    """WATCHDOG=1 arrives again and again, well within WATCHDOG_USEC."""
    pings: list[float] = []
    after = 0
    for _ in range(4):
        after = 1 + daemon.wait_message(
            lambda message: message == b"WATCHDOG=1",
            after=after,
            what=f"WATCHDOG=1 number {len(pings) + 1}",
        )
        pings.append(time.monotonic())

    # The loop ticks every 0.5 s; a slow test machine must not flake,
    # so only require that pings keep coming, not their exact spacing.
    assert 4 == len(pings)


def test_daemon_reload_on_save_sends_reloading_then_ready(
    daemon: RunningDaemon, tmp_path: Path
) -> None:
    """Saving source.ini sends RELOADING=1 with the time, then READY=1."""
    mark = len(daemon.drain())
    before = _monotonic_usec()

    (tmp_path / "source.ini").write_text(
        _sqlite_section(tmp_path, "main") + _sqlite_section(tmp_path, "more")
    )

    reloading = daemon.wait_message(
        RELOADING.fullmatch, after=mark, what="RELOADING=1 after a save"
    )
    ready = daemon.wait_message(
        READY.fullmatch, after=reloading, what="READY=1 after the reload"
    )
    after = _monotonic_usec()
    stamp = RELOADING.fullmatch(daemon.messages[reloading])
    status = READY.fullmatch(daemon.messages[ready])
    assert stamp is not None
    assert status is not None
    assert before <= int(stamp[1]) <= after
    assert b"2" == status[2]


def test_daemon_reload_on_sighup_sends_reloading_then_ready(
    daemon: RunningDaemon,
) -> None:
    """SIGHUP (systemctl reload) sends RELOADING=1, then READY=1."""
    mark = len(daemon.drain())
    before = _monotonic_usec()

    daemon.process.send_signal(signal.SIGHUP)

    reloading = daemon.wait_message(
        RELOADING.fullmatch, after=mark, what="RELOADING=1 after SIGHUP"
    )
    daemon.wait_message(
        READY.fullmatch, after=reloading, what="READY=1 after SIGHUP"
    )
    after = _monotonic_usec()
    stamp = RELOADING.fullmatch(daemon.messages[reloading])
    assert stamp is not None
    assert before <= int(stamp[1]) <= after


def test_daemon_stops_on_sigterm_with_stopping_and_status_0(
    daemon: RunningDaemon,
) -> None:
    """SIGTERM sends STOPPING=1 and the daemon exits with status 0."""
    mark = len(daemon.drain())

    status = _stop(daemon)

    assert 0 == status, daemon.log_tail()
    assert b"STOPPING=1" in daemon.drain()[mark:]


def test_daemon_runs_under_memory_deny_write_execute(
    tmp_path: Path, start_daemon: Callable[..., RunningDaemon]
) -> None:
    """The daemon and both server drivers work without W+X memory."""
    ini = (
        _sqlite_section(tmp_path, "main")
        # Nothing listens on port 1: the probes load the drivers and fail.
        + "[pg]\nsource = postgresql\nhost = 127.0.0.1\nport = 1\n"
        "base = x\nusername = x\nhealth_interval = 1s\n\n"
        "[maria]\nsource = mysql\nhost = 127.0.0.1\nport = 1\n"
        "base = x\nusername = x\nhealth_interval = 1s\n\n"
    )
    daemon = start_daemon(ini=ini, prefix=("-c", _UNDER_MDWE))
    with contextlib.suppress(subprocess.TimeoutExpired):
        if _NO_MDWE == daemon.process.wait(timeout=0.5):
            pytest.skip("this kernel has no PR_SET_MDWE (Linux < 6.3)")

    daemon.wait_message(
        READY.fullmatch, what="READY=1 under MDWE", timeout=START_TIMEOUT
    )

    def probed() -> bool:
        daemon._fail_if_exited("health.changed for every database")
        return {
            event["database"]
            for event in daemon.log_events()
            if event.get("event") == "health.changed"
        } >= {"main", "pg", "maria"}

    wait_for(probed, timeout=START_TIMEOUT, what="every database probed")
    status = _stop(daemon)
    assert 0 == status, daemon.log_tail()
