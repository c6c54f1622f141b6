"""The real daemon, in a subprocess, speaking sd_notify to a test socket."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from typing import TYPE_CHECKING, Any

import pytest

from tests.daemon_harness import (
    START_TIMEOUT,
    STEP_TIMEOUT,
    DaemonProcess,
    clean_environment,
    sqlite_section,
)
from tests.helpers import wait_for

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

#: systemd would kill the daemon after this long without WATCHDOG=1.
WATCHDOG_USEC = 400_000

READY = re.compile(rb"READY=1\nSTATUS=([0-9]+)/([0-9]+) databases up")
RELOADING = re.compile(rb"RELOADING=1\nMONOTONIC_USEC=([0-9]+)")

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


class NotifiedDaemon(DaemonProcess):
    """A dynaconnd whose NOTIFY_SOCKET is a datagram socket of the test."""

    def __init__(self, folder: Path, **options: Any) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.listener.bind(str(folder / "notify"))
        self.listener.setblocking(False)
        self.messages: list[bytes] = []
        env = clean_environment(
            NOTIFY_SOCKET=str(folder / "notify"),
            WATCHDOG_USEC=str(WATCHDOG_USEC),
        )
        super().__init__(folder, env=env, **options)

    def close(self) -> None:
        """Kill the daemon as ``DaemonProcess`` does; close the socket."""
        try:
            super().close()
        finally:
            self.listener.close()

    def drain(self) -> list[bytes]:
        """Read every datagram waiting on the socket; return them all."""
        while True:
            try:
                self.messages.append(self.listener.recv(4096))
            except BlockingIOError:
                return self.messages

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
        status = self.process and self.process.poll()
        if status is not None:
            pytest.fail(
                f"dynaconnd exited with status {status} while waiting for"
                f" {what}; messages {self.messages!r}; output:\n" + self.tail()
            )


def _sqlite_section(folder: Path, name: str) -> str:
    """Create SQLite database ``name``; return its section, probed often."""
    return sqlite_section(folder, name, extra="health_interval = 1s\n")


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., NotifiedDaemon]]:
    """Yield a function that starts dynaconnd; kill it afterwards."""
    started: list[NotifiedDaemon] = []

    def start(*, ini: str, wrapper: str | None = None) -> NotifiedDaemon:
        daemon = NotifiedDaemon(
            tmp_path,
            config=tmp_path / "source.ini",
            ini=ini,
            wrapper=wrapper,
            state_dir=None,
            # The daemon's own default, not the harness's 100ms.
            args=["--debounce", "150ms"],
        )
        started.append(daemon)
        return daemon.start(wait_ready=False)

    try:
        yield start
    finally:
        for daemon in started:
            daemon.close()


@pytest.fixture
def daemon(
    tmp_path: Path, start_daemon: Callable[..., NotifiedDaemon]
) -> NotifiedDaemon:
    """Start dynaconnd on one SQLite database and wait for READY=1."""
    running = start_daemon(ini=_sqlite_section(tmp_path, "main"))
    running.wait_message(
        READY.fullmatch, what="READY=1", timeout=START_TIMEOUT
    )
    return running


def test_daemon_sends_ready_with_database_count(
    daemon: NotifiedDaemon,
) -> None:
    """READY=1 carries an "N/M databases up" status for the 1 database."""
    ready = daemon.wait_message(READY.fullmatch, what="READY=1")

    match = READY.fullmatch(daemon.messages[ready])
    assert match is not None
    assert b"1" == match[2]


def test_daemon_sends_ready_once_after_the_socket_is_served(
    daemon: NotifiedDaemon, tmp_path: Path
) -> None:
    """Start-up sends one READY=1, no RELOADING=1, and serves first."""
    assert os.path.exists(daemon.socket)

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


def test_daemon_status_follows_health(daemon: NotifiedDaemon) -> None:
    """STATUS= reports the database up once its first probe succeeds."""
    daemon.wait_message(
        lambda message: b"STATUS=1/1 databases up" in message,
        what="STATUS=1/1 databases up",
    )


def test_daemon_feeds_the_watchdog_repeatedly(daemon: NotifiedDaemon) -> None:
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
    daemon: NotifiedDaemon, tmp_path: Path
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
    daemon: NotifiedDaemon,
) -> None:
    """SIGHUP (systemctl reload) sends RELOADING=1, then READY=1."""
    mark = len(daemon.drain())
    before = _monotonic_usec()

    daemon.send_signal(signal.SIGHUP)

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
    daemon: NotifiedDaemon,
) -> None:
    """SIGTERM sends STOPPING=1 and the daemon exits with status 0."""
    mark = len(daemon.drain())

    status = daemon.stop()

    assert 0 == status, daemon.tail()
    assert b"STOPPING=1" in daemon.drain()[mark:]


def test_daemon_runs_under_memory_deny_write_execute(
    tmp_path: Path, start_daemon: Callable[..., NotifiedDaemon]
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
    daemon = start_daemon(ini=ini, wrapper=_UNDER_MDWE)
    with contextlib.suppress(subprocess.TimeoutExpired):
        if _NO_MDWE == daemon.process.wait(timeout=0.5):
            pytest.skip("this kernel has no PR_SET_MDWE (Linux < 6.3)")

    daemon.wait_message(
        READY.fullmatch, what="READY=1 under MDWE", timeout=START_TIMEOUT
    )

    for name in ("main", "pg", "maria"):
        daemon.wait_event(
            "health.changed", database=name, timeout=START_TIMEOUT
        )
    status = daemon.stop()
    assert 0 == status, daemon.tail()
