"""Hostile or mistaken clients of the real daemon.

A wrong authkey, another user id (a throwaway system user, even one
holding a copy of the key), garbage and oversized messages, and
thousands of connections opened and dropped.  Throughout, a good client
keeps being served; each kind of refusal is logged once per reason and
user id per ``REJECTION_LOG_INTERVAL`` (later ones are counted in the
next event's ``suppressed``); the daemon's memory and threads stay
bounded.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import random
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from multiprocessing import AuthenticationError, connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import pytest

from dynaconnd.server import MAX_CONNECTIONS, REJECTION_LOG_INTERVAL
from magenta_dynaconn import DatabaseRegistry
from tests.helpers import wait_for
from tests.reliability.conftest import (
    STATS,
    DaemonFactory,
    DaemonProcess,
    assert_no_leak,
    sqlite_section,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    from magenta_dynaconn._remote import RemoteRegistry

FLOOD = 2000
#: The daemon may grow by this much over a flood (a generous bound).
RSS_GROWTH = 64 * 1024 * 1024


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[DaemonProcess, RemoteRegistry]]:
    """Run one daemon and one good client for the module."""
    factory = DaemonFactory(tmp_path_factory.mktemp("hostile"))
    folder = factory.folder / "d"
    folder.mkdir()
    try:
        daemon = factory(sqlite_section(folder, "main"))
        client = daemon.connect()
        assert ["main"] == client.list_names()
        yield daemon, client
    finally:
        factory.close()


def _good(client: RemoteRegistry) -> None:
    """A good client's control-plane call is answered."""
    assert "main" == client.describe("main")["name"]


def _loud(daemon: DaemonProcess, after: int) -> list[dict[str, Any]]:
    return [
        event
        for event in daemon.read_events()[after:]
        if event.get("level") in {"warning", "error", "critical"}
    ]


def _wrong_key(path: str) -> None:
    with pytest.raises(AuthenticationError):
        connection.Client(path, authkey=os.urandom(32))
    STATS["rejected"] += 1


def test_wrong_authkeys_are_refused_with_one_event(
    served: tuple[DaemonProcess, RemoteRegistry],
) -> None:
    """Twenty-five wrong keys: one client.rejected, good client served."""
    daemon, client = served
    mark = daemon.mark()

    for _ in range(25):
        _wrong_key(daemon.socket)
        _good(client)

    _, event = daemon.wait_event("client.rejected", after=mark)
    assert ("authkey", 0, os.getpid(), 0) == (
        event["reason"],
        event["uid"],
        event["pid"],
        event["suppressed"],
    )
    assert [event] == _loud(daemon, mark)


def test_suppressed_refusals_are_counted_in_the_next_event(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    """After the interval, the next refusal reports how many were hushed."""
    (tmp_path / "d").mkdir()
    daemon = start_daemon(sqlite_section(tmp_path / "d", "main"))
    for _ in range(10):
        _wrong_key(daemon.socket)
    daemon.wait_event("client.rejected")
    started = time.monotonic()

    wait_for(
        lambda: time.monotonic() - started > REJECTION_LOG_INTERVAL,
        timeout=REJECTION_LOG_INTERVAL + 5,
        interval=0.2,
        what="the rejection log interval to pass",
    )
    _wrong_key(daemon.socket)

    wait_for(
        lambda: 2 == len(daemon.named("client.rejected")),
        what="the second client.rejected",
    )
    events = daemon.named("client.rejected")
    assert [("authkey", 0), ("authkey", 9)] == [
        (event["reason"], event["suppressed"]) for event in events
    ]


def _send_raw(path: str, data: bytes, *, read_first: bool) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(path)
        if read_first:
            sock.recv(64)
        with contextlib.suppress(OSError):
            sock.sendall(data)


def _open(path: str) -> socket.socket:
    """Connect to ``path``, waiting while the listen backlog is full."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Blocking: a timeout would make a full backlog fail at once (EAGAIN).
    sock.connect(path)
    sock.settimeout(5)
    return sock


def _authenticated(daemon: DaemonProcess) -> connection.Connection:
    key = Path(daemon.authkey_file).read_bytes()
    conn = connection.Client(daemon.socket, authkey=key)
    conn.send((None, "accept_connection", ("hostile",), {}))
    assert "#RETURN" == conn.recv()[0]
    return conn


def test_garbage_and_oversized_messages_end_only_their_client(
    served: tuple[DaemonProcess, RemoteRegistry],
) -> None:
    """Noise, huge headers and bad pickles drop that client, not others."""
    daemon, client = served
    mark = daemon.mark()
    noise = random.Random(11)

    # Before the handshake: nothing worth a warning.
    _send_raw(daemon.socket, noise.randbytes(300), read_first=True)
    _send_raw(daemon.socket, b"\xff" * 12, read_first=True)
    _send_raw(daemon.socket, b"\x7f\xff\xff\xff", read_first=False)
    _good(client)

    # After it: a bad pickle gets an error reply; a 2 GiB header ends
    # the connection with one message_too_large.
    conn = _authenticated(daemon)
    conn.send_bytes(b"not a pickle at all")
    assert "#TRACEBACK" == conn.recv()[0]
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:
        sock.sendall(b"\xff\xff\xff\xff" + (2**31).to_bytes(8, "big"))
        sock.settimeout(5)
        assert b"" == sock.recv(1)
    conn.close()
    STATS["rejected"] += 1
    _good(client)

    # A 5 MB source.ini to check is refused as a file, not a crash.
    checked = client.check("[big]\n" + "; x\n" * 1_300_000)
    assert not checked["ok"]
    assert [None] == [issue["line"] for issue in checked["file_issues"]]

    _, event = daemon.wait_event("client.rejected", after=mark)
    assert ("message_too_large", 0) == (event["reason"], event["uid"])
    assert [event] == _loud(daemon, mark)
    _good(client)


def test_thousands_of_dropped_connections_leave_memory_bounded(
    served: tuple[DaemonProcess, RemoteRegistry],
) -> None:
    """2,000 connections come and go; RSS and threads stay bounded."""
    daemon, client = served
    process = psutil.Process(daemon.pid)
    threads = process.num_threads()
    rss = daemon.rss()
    mark = daemon.mark()

    for batch in range(FLOOD // 100):
        held = []
        for number in range(100):
            sock = _open(daemon.socket)
            if number % 2:
                # Half read the challenge and answer garbage: each is a
                # failed authentication.
                sock.recv(64)
                with contextlib.suppress(OSError):
                    sock.sendall(b"\x00\x00\x00\x04junk")
            held.append(sock)
        for sock in held:
            sock.close()
        if batch % 5 == 0:
            _good(client)
    STATS["rejected"] += FLOOD // 2

    wait_for(
        lambda: process.num_threads() <= threads,
        timeout=15,
        what="the connection threads to end",
    )
    assert daemon.rss() - rss < RSS_GROWTH
    # At most one event for a thousand bad answers (none if an authkey
    # refusal was logged less than the interval ago).
    loud = _loud(daemon, mark)
    assert len(loud) <= 1
    assert {("client.rejected", "authkey")} >= {
        (event["event"], event["reason"]) for event in loud
    }
    _good(client)


def test_more_connections_than_allowed_are_turned_away_once(
    served: tuple[DaemonProcess, RemoteRegistry],
) -> None:
    """Beyond MAX_CONNECTIONS: refused with one event; served ones go on."""
    daemon, client = served
    _good(client)
    mark = daemon.mark()
    held = []
    try:
        for _ in range(MAX_CONNECTIONS + 44):
            held.append(_open(daemon.socket))
        _, event = daemon.wait_event("client.rejected", after=mark)
        _good(client)
    finally:
        for sock in held:
            sock.close()
    STATS["rejected"] += 44

    assert ("too_many_connections", 0) == (event["reason"], event["uid"])
    assert [event] == _loud(daemon, mark)
    fresh = wait_for(
        lambda: _connect(daemon), timeout=10, what="a new client to connect"
    )
    assert fresh is not None
    try:
        _good(fresh)
    finally:
        fresh.close()


def _connect(daemon: DaemonProcess) -> RemoteRegistry | None:
    try:
        client: RemoteRegistry = DatabaseRegistry.connect(
            socket=daemon.socket, authkey_file=daemon.authkey_file
        )
    except ConnectionError:
        return None
    return client


# -- another user -----------------------------------------------------------

# The venv's interpreter lives under /root, out of another user's reach,
# so they speak the client's handshake with the system Python's stdlib.
_AS_OTHER = """\
import sys
from multiprocessing import connection
key = open(sys.argv[2], "rb").read()
try:
    conn = connection.Client(sys.argv[1], authkey=key)
    conn.send((None, "accept_connection", ("other",), {}))
    conn.recv()
except (OSError, EOFError) as error:
    print("unavailable", type(error).__name__)
else:
    print("served")
"""


@pytest.fixture
def other_user() -> Iterator[pwd.struct_passwd]:
    """Create a throwaway system user (needs root); remove it afterwards."""
    if os.geteuid() != 0 or not (
        shutil.which("useradd") and shutil.which("runuser")
    ):
        pytest.skip("creating a user needs root, useradd and runuser")
    name = f"dynrel{uuid.uuid4().hex[:6]}"
    subprocess.run(
        ["useradd", "--system", "-M", "-s", "/usr/sbin/nologin", name],
        check=True,
    )
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=False)
        with contextlib.suppress(KeyError):
            grp.getgrnam(name)
            subprocess.run(["groupdel", name], check=False)


@pytest.fixture
def shared_folder() -> Iterator[Path]:
    """Return a folder other users may enter (tmp_path is private)."""
    base = Path(tempfile.mkdtemp(prefix="dynaconn-rel-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _runuser(user: pwd.struct_passwd, python: str) -> list[str]:
    return ["runuser", "-u", user.pw_name, "--", python]


def _connect_as(user: pwd.struct_passwd, socket: str, key: str) -> str:
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.skip("a system python3 that other users may run is needed")
    result = subprocess.run(
        [*_runuser(user, python), "-c", _AS_OTHER, socket, key],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd="/",
    )
    output = result.stdout + result.stderr
    assert_no_leak("another user's client", output)
    return output


def test_another_user_is_refused_even_with_a_copy_of_the_key(
    other_user: pwd.struct_passwd, shared_folder: Path
) -> None:
    """The folder mode stops them; opened modes leave SO_PEERCRED, once."""
    factory = DaemonFactory(shared_folder)
    try:
        folder = shared_folder / "d"
        folder.mkdir()
        folder.chmod(0o755)
        daemon = factory(sqlite_section(folder, "main"))
        client = daemon.connect()
        stolen = shared_folder / "stolen-key"
        stolen.write_bytes(Path(daemon.authkey_file).read_bytes())
        stolen.chmod(0o600)
        os.chown(stolen, other_user.pw_uid, other_user.pw_gid)
        mark = daemon.mark()

        # The socket's folder is 0700: the kernel says no.
        denied = _connect_as(other_user, daemon.socket, str(stolen))
        assert denied.startswith("unavailable"), denied
        assert "PermissionError" in denied
        assert [] == daemon.named("client.rejected", after=mark)

        # Modes opened by mistake: the peer check turns them away, and
        # three attempts make one event.
        os.chmod(os.path.dirname(daemon.socket), 0o755)
        os.chmod(daemon.socket, 0o666)
        for _ in range(3):
            refused = _connect_as(other_user, daemon.socket, str(stolen))
            assert refused.startswith("unavailable"), refused
            _good(client)
        STATS["rejected"] += 4

        _, event = daemon.wait_event("client.rejected", after=mark)
        assert ("peer", other_user.pw_uid, 0) == (
            event["reason"],
            event["uid"],
            event["suppressed"],
        )
        assert 1 == len(daemon.named("client.rejected", after=mark))
    finally:
        factory.close()
