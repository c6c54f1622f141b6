"""The sd_notify protocol, spoken to a real datagram socket."""

from __future__ import annotations

import os
import re
import socket
import time
import uuid
from typing import TYPE_CHECKING

import pytest
from structlog.testing import capture_logs

from dynaconnd.notify import Notifier

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

#: How long a test waits for a datagram that should already be there.
RECEIVE_TIMEOUT = 5.0


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """Bind a datagram socket in ``tmp_path``; yield it and its address."""
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(RECEIVE_TIMEOUT)
    try:
        yield sock, path
    finally:
        sock.close()


@pytest.fixture
def notifier(receiver: tuple[socket.socket, str]) -> Iterator[Notifier]:
    """Yield a notifier aimed at the ``receiver`` socket."""
    _, path = receiver
    notifier = Notifier({"NOTIFY_SOCKET": path})
    try:
        yield notifier
    finally:
        notifier.close()


def _receive(receiver: tuple[socket.socket, str]) -> bytes:
    sock, _ = receiver
    return sock.recv(4096)


def test_ready_sends_ready_and_status(
    notifier: Notifier, receiver: tuple[socket.socket, str]
) -> None:
    """ready() sends READY=1 and the status in one datagram."""
    notifier.ready("2/3 databases up")

    assert b"READY=1\nSTATUS=2/3 databases up" == _receive(receiver)


def test_ready_without_status_sends_ready_only(
    notifier: Notifier, receiver: tuple[socket.socket, str]
) -> None:
    """ready() with no status sends a bare READY=1."""
    notifier.ready()

    assert b"READY=1" == _receive(receiver)


def test_reloading_sends_current_monotonic_time(
    notifier: Notifier, receiver: tuple[socket.socket, str]
) -> None:
    """reloading() sends RELOADING=1 and CLOCK_MONOTONIC in microseconds."""
    before = _monotonic_usec()
    notifier.reloading()
    after = _monotonic_usec()

    match = re.fullmatch(
        rb"RELOADING=1\nMONOTONIC_USEC=([0-9]+)", _receive(receiver)
    )

    assert match is not None
    assert before <= int(match[1]) <= after


def test_stopping_sends_stopping(
    notifier: Notifier, receiver: tuple[socket.socket, str]
) -> None:
    """stopping() sends STOPPING=1."""
    notifier.stopping()

    assert b"STOPPING=1" == _receive(receiver)


def test_status_sends_status_line(
    notifier: Notifier, receiver: tuple[socket.socket, str]
) -> None:
    """status() sends one STATUS= line, UTF-8 encoded."""
    notifier.status("1/1 databases up \N{EM DASH} crm slow")

    expected = "STATUS=1/1 databases up \N{EM DASH} crm slow".encode()
    assert expected == _receive(receiver)


def test_watchdog_sends_watchdog(
    notifier: Notifier, receiver: tuple[socket.socket, str]
) -> None:
    """watchdog() sends WATCHDOG=1."""
    notifier.watchdog()

    assert b"WATCHDOG=1" == _receive(receiver)


def test_each_call_is_one_datagram_in_order(
    notifier: Notifier, receiver: tuple[socket.socket, str]
) -> None:
    """Successive calls arrive as separate datagrams, in order."""
    notifier.ready()
    notifier.watchdog()
    notifier.stopping()

    received = [_receive(receiver) for _ in range(3)]

    assert [b"READY=1", b"WATCHDOG=1", b"STOPPING=1"] == received


def test_send_works_again_after_close(
    notifier: Notifier, receiver: tuple[socket.socket, str]
) -> None:
    """A closed notifier opens a new socket on the next send."""
    notifier.watchdog()
    notifier.close()
    notifier.stopping()

    assert [b"WATCHDOG=1", b"STOPPING=1"] == [
        _receive(receiver),
        _receive(receiver),
    ]


def test_abstract_address_is_reached() -> None:
    """An address starting with @ names the abstract namespace."""
    name = f"dynaconn-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(RECEIVE_TIMEOUT)
    notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
    try:
        notifier.ready("0/0 databases up")

        assert b"READY=1\nSTATUS=0/0 databases up" == sock.recv(4096)
    finally:
        notifier.close()
        sock.close()


def test_reads_process_environment_by_default(
    monkeypatch: pytest.MonkeyPatch, receiver: tuple[socket.socket, str]
) -> None:
    """Without an explicit mapping the notifier reads os.environ."""
    _, path = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    notifier = Notifier()
    try:
        notifier.stopping()
    finally:
        notifier.close()

    assert b"STOPPING=1" == _receive(receiver)


def test_without_notify_socket_does_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Outside a notify unit the notifier opens no socket and sends nothing."""

    def refuse(*args: object, **kwargs: object) -> socket.socket:
        raise AssertionError("a socket was opened")

    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setattr(socket, "socket", refuse)
    notifier = Notifier()

    notifier.ready("1/1 databases up")
    notifier.reloading()
    notifier.status("x")
    notifier.watchdog()
    notifier.stopping()
    notifier.close()

    assert False is notifier.enabled


def test_empty_notify_socket_is_disabled() -> None:
    """An empty NOTIFY_SOCKET counts as unset."""
    assert False is Notifier({"NOTIFY_SOCKET": ""}).enabled


def test_set_notify_socket_is_enabled(tmp_path: Path) -> None:
    """A NOTIFY_SOCKET path enables the notifier."""
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify")})

    assert True is notifier.enabled


def test_unreachable_socket_logs_and_does_not_raise(tmp_path: Path) -> None:
    """A send that fails is logged as notify.failed and swallowed."""
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "missing")})
    try:
        with capture_logs() as events:
            notifier.ready()
    finally:
        notifier.close()

    assert [
        {
            "event": "notify.failed",
            "log_level": "warning",
            "component": "notify",
            "error_class": "FileNotFoundError",
        }
    ] == events


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "400000"}, 0.2),
        ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "<own>"}, 0.2),
        ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": ""}, 0.2),
        ({}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "-400000"}, None),
        ({"WATCHDOG_USEC": "1.5"}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec(
    environ: dict[str, str], expected: float | None
) -> None:
    """The ping interval is half of WATCHDOG_USEC, or None when unusable."""
    environ = {
        key: str(os.getpid()) if value == "<own>" else value
        for key, value in environ.items()
    }

    assert expected == Notifier(environ).watchdog_interval


def test_watchdog_for_another_pid_is_ignored() -> None:
    """A WATCHDOG_PID naming another process turns the watchdog off."""
    other = str(os.getpid() + 1)
    notifier = Notifier({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": other})

    assert None is notifier.watchdog_interval
