"""Tests for dynaconnd.server: the socket, its guards and the authkey.

The server under test runs in a real subprocess (``ServerProcess``)
serving ``DemoService``, a small stand-in for the daemon's service over
SQLite files; its log events arrive as JSON lines on its stdout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import grp
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from multiprocessing import AuthenticationError, connection, managers
from typing import TYPE_CHECKING, Any, TypedDict

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import URL

from dynaconnd import schema
from dynaconnd.engines import build_engine
from dynaconnd.errors import UnknownDatabaseError, UnknownTableError
from dynaconnd.genfile import GenerationWriter, generation_path
from dynaconnd.logs import configure_logging, get_logger
from dynaconnd.protocol import (
    PROTOCOL_VERSION,
    SERVICE_IDENT,
    SERVICE_METHODS,
    spec_to_wire,
)
from dynaconnd.registry import unknown_database
from dynaconnd.server import (
    AUTHKEY_MODE,
    FOLDER_MODE,
    GROUP_AUTHKEY_MODE,
    GROUP_FOLDER_MODE,
    GROUP_SOCKET_MODE,
    SOCKET_MODE,
    InsecureFileError,
    SocketInUseError,
    SocketServer,
    default_authkey_path,
    default_runtime_dir,
    default_socket_path,
    load_or_create_authkey,
    read_authkey,
)
from dynaconnd.spec import DatabaseSpec, EngineOptions
from tests.helpers import wait_for

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

log = get_logger("test")


class Paths(TypedDict):
    """Where one test's daemon keeps its socket, key and databases."""

    socket: str
    authkey_file: str
    data_dir: str


def dispatch(
    conn: connection.Connection, ident: str | None, method: str, *args: Any
) -> Any:
    """Make one manager call the way ``BaseProxy`` does."""
    conn.send((ident, method, args, {}))
    kind, result = conn.recv()
    if kind == "#RETURN":
        return result
    if kind == "#ERROR":
        raise result
    raise managers.RemoteError(result)


# -- the stand-in service ---------------------------------------------------


class DemoService:
    """The daemon's service calls, over SQLite files in ``data_dir``."""

    def __init__(
        self,
        data_dir: str,
        names: list[str],
        *,
        protocol: int = PROTOCOL_VERSION,
    ) -> None:
        self.data_dir = data_dir
        self.protocol = protocol
        self._lock = threading.Lock()
        self._specs: dict[str, DatabaseSpec] = {}
        self._engines: dict[str, sa.Engine] = {}
        self._schema_generations: dict[str, int] = {}
        self._generation = 0
        self._epoch = 0
        for name in names:
            self._add(name)
        self._generation = 1

    # Changes the tests drive.

    def _add(self, name: str, recycle: float | None = None) -> None:
        path = os.path.join(self.data_dir, f"{name}.db")
        spec = DatabaseSpec(
            name=name,
            url=URL.create("sqlite", database=path),
            engine=EngineOptions(pool_recycle=recycle),
        )
        engine = build_engine(spec)
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "CREATE TABLE IF NOT EXISTS customer"
                    " (id INTEGER PRIMARY KEY, name TEXT)"
                )
            )
        old = self._engines.pop(name, None)
        if old is not None:
            old.dispose()
        self._specs[name] = spec
        self._engines[name] = engine
        self._schema_generations.setdefault(name, 1)

    def command(self, verb: str, name: str) -> None:
        """Apply one change: add, remove, touch (new spec) or schema."""
        with self._lock:
            if verb == "add":
                self._add(name)
            elif verb == "touch":
                recycle = self._specs[name].engine.pool_recycle or 0
                self._add(name, recycle=recycle + 1)
            elif verb == "remove":
                del self._specs[name]
                self._engines.pop(name).dispose()
            elif verb == "schema":
                self._schema_generations[name] += 1
            else:
                raise ValueError(verb)
            if verb != "schema":
                self._generation += 1
            self._epoch += 1

    def close(self) -> None:
        """Dispose the engines."""
        for engine in self._engines.values():
            engine.dispose()

    def _spec(self, name: str) -> DatabaseSpec:
        spec = self._specs.get(name)
        if spec is None:
            raise unknown_database(name, self._specs)
        return spec

    # The service calls, as the daemon answers them.

    def hello(self, client_protocol: int) -> dict[str, Any]:
        log.debug("test.call", method="hello")
        return {
            "protocol": self.protocol,
            "version": "test",
            "generation": self._generation,
            "epoch": self._epoch,
            "client_protocol": client_protocol,
        }

    def generation(self) -> int:
        return self._generation

    def epoch(self) -> int:
        return self._epoch

    def names(self) -> list[str]:
        return list(self._specs)

    def describe(self, name: str) -> dict[str, Any]:
        log.debug("test.call", method="describe")
        return self._spec(name).describe()

    def connection_spec(self, name: str) -> dict[str, Any]:
        return spec_to_wire(self._spec(name))

    def specs(self) -> dict[str, Any]:
        log.debug("test.call", method="specs")
        with self._lock:
            return {
                "generation": self._generation,
                "epoch": self._epoch,
                "specs": {
                    name: spec_to_wire(spec)
                    for name, spec in self._specs.items()
                },
                "schema_generations": dict(self._schema_generations),
            }

    def tables(self, name: str) -> list[str]:
        spec = self._spec(name)
        return schema.list_tables(self._engines[name], spec.reflection)

    def table_description(self, name: str, table: str) -> dict[str, Any]:
        spec = self._spec(name)
        found = schema.reflect_tables(
            self._engines[name], spec.reflection, [table]
        )
        if table not in found:
            raise UnknownTableError(f"database {name!r} has no {table!r}")
        return found[table]

    def schema_generation(self, name: str) -> int:
        self._spec(name)
        return self._schema_generations[name]

    def last_outcome(self) -> dict[str, Any]:
        return {"applied": True, "generation": self._generation}

    def reload(self) -> dict[str, Any]:
        return self.last_outcome()

    def health(self) -> dict[str, Any]:
        return {name: {"state": "up"} for name in self._specs}

    def ping(self, name: str) -> dict[str, Any]:
        self._spec(name)
        with self._engines[name].connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        return {"ok": True}

    def check(self, text: str) -> dict[str, Any]:
        return {"ok": True, "length": len(text)}

    def add_instance(
        self, name: str, data: dict[str, Any], overwrite: bool = False
    ) -> dict[str, Any]:
        self.command("add", name)
        return self.last_outcome()

    def update_instance(
        self, name: str, data: dict[str, Any]
    ) -> dict[str, Any]:
        self.command("touch", name)
        return self.last_outcome()

    def remove_instance(self, name: str) -> dict[str, Any]:
        self.command("remove", name)
        return self.last_outcome()


def serve_main(options: dict[str, Any]) -> None:
    """Serve a DemoService until "stop" arrives on stdin (subprocess)."""
    configure_logging(fmt="json", level="debug")
    service = DemoService(
        options["data_dir"],
        options["names"],
        protocol=options.get("protocol", PROTOCOL_VERSION),
    )
    authkey = load_or_create_authkey(options["authkey_file"])
    server = SocketServer(
        service,
        socket_path=options["socket"],
        authkey=authkey,
        allowed_gid=options.get("allowed_gid"),
        exposed=SERVICE_METHODS,
    )
    server.start()
    writer = GenerationWriter(generation_path(options["socket"]))
    writer.publish(service.epoch())
    log.info("test.ready", pid=os.getpid())
    for line in sys.stdin:
        words = line.split()
        if words == ["stop"]:
            break
        service.command(*words)
        writer.publish(service.epoch())
        log.info("test.done", command=line.strip())
    server.stop()
    writer.close()
    service.close()
    log.info("test.stopped")


@dataclasses.dataclass
class ServerProcess:
    """A DemoService served by a real ``dynaconnd.server`` subprocess."""

    socket: str
    authkey_file: str
    data_dir: str
    names: list[str] = dataclasses.field(default_factory=lambda: ["main"])
    allowed_gid: int | None = None
    protocol: int = PROTOCOL_VERSION
    events: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> ServerProcess:
        """Start serving and wait until the socket is up."""
        os.makedirs(self.data_dir, exist_ok=True)
        self.events = []
        options = {
            "socket": self.socket,
            "authkey_file": self.authkey_file,
            "data_dir": self.data_dir,
            "names": self.names,
            "allowed_gid": self.allowed_gid,
            "protocol": self.protocol,
        }
        script = (
            "import json, sys\n"
            "from tests.test_server import serve_main\n"
            "serve_main(json.loads(sys.argv[1]))\n"
        )
        self._process = subprocess.Popen(
            [sys.executable, "-u", "-c", script, json.dumps(options)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(
            target=self._read, name="test-server-stdout", daemon=True
        )
        self._reader.start()
        self.wait_event("test.ready", timeout=30)
        return self

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def _read(self) -> None:
        assert self._process is not None
        assert self._process.stdout
        for line in self._process.stdout:
            with contextlib.suppress(ValueError):
                self.events.append(json.loads(line))

    def named(self, event: str) -> list[dict[str, Any]]:
        """Return the events called ``event`` so far."""
        return [item for item in self.events if item["event"] == event]

    def wait_event(
        self, event: str, *, count: int = 1, timeout: float = 10
    ) -> list[dict[str, Any]]:
        """Wait until ``count`` events called ``event`` have arrived."""

        def arrived() -> list[dict[str, Any]]:
            found = self.named(event)
            return found if len(found) >= count else []

        return wait_for(
            arrived, timeout=timeout, what=f"{count} {event} event(s)"
        )

    def command(self, text: str) -> None:
        """Change the service (see DemoService.command) and wait for it."""
        assert self._process is not None
        assert self._process.stdin
        done = len(self.named("test.done"))
        self._process.stdin.write(text + "\n")
        self._process.stdin.flush()
        self.wait_event("test.done", count=done + 1)

    def alive(self) -> bool:
        """Return whether the process is running."""
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        """Stop the server cleanly and wait for the process to exit."""
        if self._process is None:
            return
        if self._process.poll() is None:
            assert self._process.stdin
            with contextlib.suppress(BrokenPipeError):
                self._process.stdin.write("stop\n")
                self._process.stdin.flush()
        self._finish()

    def kill(self) -> None:
        """Kill the server with SIGKILL: nothing is cleaned up."""
        if self._process is None:
            return
        self._process.send_signal(signal.SIGKILL)
        self._finish()

    def _finish(self) -> None:
        assert self._process is not None
        try:
            self._process.wait(timeout=20)
        finally:
            if self._process.poll() is None:
                self._process.kill()
                self._process.wait()
            if self._process.stdin:
                with contextlib.suppress(BrokenPipeError):
                    self._process.stdin.close()
            if self._reader is not None:
                self._reader.join(timeout=5)
            if self._process.stdout:
                self._process.stdout.close()
            self._process = None


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    """Return the socket, key and data paths of one test's daemon."""
    return {
        "socket": str(tmp_path / "run" / "dynaconnd.sock"),
        "authkey_file": str(tmp_path / "run" / "authkey"),
        "data_dir": str(tmp_path / "data"),
    }


@pytest.fixture
def server(paths: Paths) -> Iterator[ServerProcess]:
    """Yield a running ServerProcess; stop it afterwards."""
    process = ServerProcess(**paths).start()
    try:
        yield process
    finally:
        process.stop()


def raw_call(socket_path: str, authkey: bytes, method: str, *args: Any) -> Any:
    """Call the service the way any stdlib manager client would."""
    conn = connection.Client(socket_path, authkey=authkey)
    try:
        dispatch(conn, None, "accept_connection", "test")
        return dispatch(conn, SERVICE_IDENT, method, *args)
    finally:
        conn.close()


def no_warnings_but(
    server: ServerProcess, *expected: str
) -> list[dict[str, Any]]:
    """Return the warnings and errors logged, failing on unexpected ones."""
    loud = [
        event
        for event in server.events
        if event.get("level") in {"warning", "error", "critical"}
    ]
    assert [] == [event for event in loud if event["event"] not in expected]
    return loud


# -- files and modes --------------------------------------------------------


def test_socket_folder_and_key_are_private(
    server: ServerProcess, paths: Paths
) -> None:
    """Socket 0600, its folder 0700 and the key 0600, all created."""
    folder = os.path.dirname(paths["socket"])

    assert SOCKET_MODE == stat.S_IMODE(os.stat(paths["socket"]).st_mode)
    assert stat.S_ISSOCK(os.stat(paths["socket"]).st_mode)
    assert FOLDER_MODE == stat.S_IMODE(os.stat(folder).st_mode)
    assert AUTHKEY_MODE == stat.S_IMODE(os.stat(paths["authkey_file"]).st_mode)
    assert 32 == len(read_authkey(paths["authkey_file"]))


def test_group_modes_with_an_allowed_group(tmp_path: Path) -> None:
    """With a client group: socket 0660, folder 0750, key 0640, its gid."""
    gid = os.getgid()
    socket_path = str(tmp_path / "run" / "dynaconnd.sock")
    key_path = str(tmp_path / "run" / "authkey")
    key = load_or_create_authkey(key_path, group_readable=True, gid=gid)
    server = SocketServer(
        DemoService(str(tmp_path), []),
        socket_path=socket_path,
        authkey=key,
        allowed_gid=gid,
        exposed=SERVICE_METHODS,
    )
    server.start()
    try:
        status = os.stat(socket_path)
        assert GROUP_SOCKET_MODE == stat.S_IMODE(status.st_mode)
        assert gid == status.st_gid
        folder = os.stat(os.path.dirname(socket_path))
        assert GROUP_FOLDER_MODE == stat.S_IMODE(folder.st_mode)
        assert GROUP_AUTHKEY_MODE == stat.S_IMODE(os.stat(key_path).st_mode)
    finally:
        server.stop()


def test_stop_removes_the_socket_and_joins_its_threads(
    tmp_path: Path,
) -> None:
    """After stop() the socket file is gone and no thread is left."""
    socket_path = str(tmp_path / "run" / "dynaconnd.sock")
    key = load_or_create_authkey(str(tmp_path / "run" / "authkey"))
    server = SocketServer(
        DemoService(str(tmp_path), ["main"]),
        socket_path=socket_path,
        authkey=key,
        exposed=SERVICE_METHODS,
    )
    server.start()
    # One client still connected while the server stops.
    conn = connection.Client(socket_path, authkey=key)
    dispatch(conn, None, "accept_connection", "test")
    assert ["main"] == dispatch(conn, SERVICE_IDENT, "names")
    assert server.is_serving

    server.stop()

    assert not os.path.exists(socket_path)
    assert not server.is_serving
    with pytest.raises(EOFError):
        conn.recv()
    conn.close()
    assert [] == [
        thread.name
        for thread in threading.enumerate()
        if thread.name.startswith("dynaconn-server")
    ]


def test_stale_socket_of_a_killed_server_is_replaced(
    paths: Paths,
) -> None:
    """A server killed with SIGKILL leaves its socket; the next replaces it."""
    first = ServerProcess(**paths).start()
    first.kill()
    assert os.path.exists(paths["socket"])

    second = ServerProcess(**paths).start()
    try:
        key = read_authkey(paths["authkey_file"])
        assert ["main"] == raw_call(paths["socket"], key, "names")
    finally:
        second.stop()


def test_a_live_server_is_never_replaced(
    server: ServerProcess, paths: Paths, tmp_path: Path
) -> None:
    """Starting on a socket someone serves fails and leaves it alone."""
    key = read_authkey(paths["authkey_file"])
    other = SocketServer(
        DemoService(str(tmp_path), []),
        socket_path=paths["socket"],
        authkey=key,
        exposed=SERVICE_METHODS,
    )

    with pytest.raises(SocketInUseError, match="another process"):
        other.start()

    assert ["main"] == raw_call(paths["socket"], key, "names")


def test_a_file_that_is_not_a_socket_is_never_replaced(
    tmp_path: Path,
) -> None:
    """A regular file where the socket goes is an error, not a victim."""
    path = tmp_path / "dynaconnd.sock"
    path.write_text("precious")
    server = SocketServer(
        object(), socket_path=str(path), authkey=b"k" * 32, exposed=()
    )

    with pytest.raises(SocketInUseError, match="not a socket"):
        server.start()

    assert "precious" == path.read_text()


# -- the authkey file -------------------------------------------------------


def test_authkey_is_created_once_and_then_reused(tmp_path: Path) -> None:
    """A missing key is made (32 bytes, 0600); later calls read it."""
    path = str(tmp_path / "keys" / "authkey")

    key = load_or_create_authkey(path)

    assert 32 == len(key)
    assert AUTHKEY_MODE == stat.S_IMODE(os.stat(path).st_mode)
    assert key == load_or_create_authkey(path)
    assert [] == [
        name for name in os.listdir(tmp_path / "keys") if name.startswith(".")
    ]


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o660, 0o606])
def test_authkey_readable_or_writable_by_others_is_refused(
    tmp_path: Path, mode: int
) -> None:
    """A key others could read or change is refused, naming the mode."""
    path = tmp_path / "authkey"
    path.write_bytes(os.urandom(32))
    path.chmod(mode)

    with pytest.raises(InsecureFileError, match=f"mode {mode:04o}"):
        load_or_create_authkey(str(path))
    with pytest.raises(PermissionError):
        read_authkey(str(path))


def test_short_authkey_is_refused(tmp_path: Path) -> None:
    """A key too short to be random enough is refused."""
    path = tmp_path / "authkey"
    path.write_bytes(b"secret")
    path.chmod(0o600)

    with pytest.raises(InsecureFileError, match="at least 16"):
        read_authkey(str(path))


def test_default_paths_follow_the_environment() -> None:
    """systemd, then the session's runtime folder, then /run."""
    assert "/run/dynaconnd" == default_runtime_dir({})
    assert "/run/user/7/dynaconnd" == default_runtime_dir(
        {"XDG_RUNTIME_DIR": "/run/user/7"}
    )
    systemd = {"RUNTIME_DIRECTORY": "/run/a:/run/b", "XDG_RUNTIME_DIR": "/x"}
    assert "/run/a" == default_runtime_dir(systemd)
    assert "/run/a/dynaconnd.sock" == default_socket_path(systemd)
    assert "/run/a/authkey" == default_authkey_path(systemd)
    assert "/s.sock" == default_socket_path({"DYNACONN_SOCKET": "/s.sock"})
    assert "/k" == default_authkey_path({"DYNACONN_AUTHKEY_FILE": "/k"})


# -- who is served ----------------------------------------------------------


def test_service_answers_plain_data(
    server: ServerProcess, paths: Paths
) -> None:
    """A stdlib client gets plain values back from exposed methods."""
    key = read_authkey(paths["authkey_file"])

    hello = raw_call(paths["socket"], key, "hello", PROTOCOL_VERSION)
    specs = raw_call(paths["socket"], key, "specs")

    assert PROTOCOL_VERSION == hello["protocol"]
    assert specs == json.loads(json.dumps(specs))


def test_unknown_database_error_crosses_the_socket(
    server: ServerProcess, paths: Paths
) -> None:
    """The service's UnknownDatabaseError is re-raised as itself."""
    key = read_authkey(paths["authkey_file"])

    with pytest.raises(UnknownDatabaseError, match="did you mean main"):
        raw_call(paths["socket"], key, "describe", "mian")


def test_only_exposed_methods_can_be_called(
    server: ServerProcess, paths: Paths
) -> None:
    """Private methods, the server's shutdown and #GETVALUE are refused."""
    key = read_authkey(paths["authkey_file"])

    for method in ("_spec", "command", "#GETVALUE"):
        with pytest.raises(managers.RemoteError, match="not in exposed"):
            raw_call(paths["socket"], key, method)
    conn = connection.Client(paths["socket"], authkey=key)
    try:
        with pytest.raises(managers.RemoteError, match="not a server call"):
            dispatch(conn, None, "shutdown")
    finally:
        conn.close()

    assert ["main"] == raw_call(paths["socket"], key, "names")


def test_wrong_authkey_is_refused_with_one_event(
    server: ServerProcess, paths: Paths
) -> None:
    """A wrong key: refused, one client.rejected event, still serving."""
    with pytest.raises(AuthenticationError):
        connection.Client(paths["socket"], authkey=os.urandom(32))

    (event,) = server.wait_event("client.rejected")
    assert "authkey" == event["reason"]
    assert os.getuid() == event["uid"]
    assert os.getpid() == event["pid"]
    assert "warning" == event["level"]
    key = read_authkey(paths["authkey_file"])
    assert ["main"] == raw_call(paths["socket"], key, "names")
    assert 1 == len(server.named("client.rejected"))


def test_repeated_wrong_authkeys_do_not_flood_the_log(
    server: ServerProcess, paths: Paths
) -> None:
    """Twenty bad attempts in a row make one warning, not twenty."""
    for _ in range(20):
        with pytest.raises(AuthenticationError):
            connection.Client(paths["socket"], authkey=os.urandom(32))
    key = read_authkey(paths["authkey_file"])
    assert ["main"] == raw_call(paths["socket"], key, "names")

    assert 1 == len(server.named("client.rejected"))


def _send_raw(path: str, data: bytes, *, read_first: bool = True) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(path)
        if read_first:
            sock.recv(64)
        sock.sendall(data)


def test_garbage_and_dropped_connections_do_not_hurt_the_server(
    server: ServerProcess, paths: Paths
) -> None:
    """Noise, a half message, a huge length and hang-ups are shrugged off."""
    path = paths["socket"]
    _send_raw(path, os.urandom(300))
    _send_raw(path, b"\xff" * 12)
    _send_raw(path, b"\x00\x00\x03\xe8" + b"half a message")
    _send_raw(path, b"", read_first=False)
    _send_raw(path, b"\x00\x00", read_first=False)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)

    key = read_authkey(paths["authkey_file"])
    assert ["main"] == raw_call(paths["socket"], key, "names")
    assert server.alive()
    no_warnings_but(server, "client.rejected")


def test_oversized_request_from_a_client_ends_only_that_client(
    server: ServerProcess, paths: Paths
) -> None:
    """A length header beyond the limit drops that connection only."""
    key = read_authkey(paths["authkey_file"])
    conn = connection.Client(paths["socket"], authkey=key)
    dispatch(conn, None, "accept_connection", "test")
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:
        # -1 then an 8-byte length: the stdlib's header for 2 GiB.
        sock.sendall(b"\xff\xff\xff\xff" + (2**31).to_bytes(8, "big"))
        sock.settimeout(5)
        assert b"" == sock.recv(1)
    conn.close()

    assert ["main"] == raw_call(paths["socket"], key, "names")
    (event,) = server.wait_event("client.rejected")
    assert "message_too_large" == event["reason"]


# -- peers of another user --------------------------------------------------


@pytest.fixture
def other_user() -> Iterator[pwd.struct_passwd]:
    """Create a throwaway system user (needs root); remove it afterwards."""
    if os.geteuid() != 0:
        pytest.skip("creating a user needs root")
    if not (shutil.which("useradd") and shutil.which("runuser")):
        pytest.skip("useradd and runuser are needed")
    name = f"dyn{uuid.uuid4().hex[:8]}"
    subprocess.run(
        ["useradd", "--system", "-M", "-s", "/usr/sbin/nologin", name],
        check=True,
    )
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=False)
        # userdel keeps the user's group where USERGROUPS_ENAB is off.
        with contextlib.suppress(KeyError):
            grp.getgrnam(name)
            subprocess.run(["groupdel", name], check=False)


PROBE = """
import socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(5)
try:
    sock.connect(sys.argv[1])
except PermissionError:
    print("denied")
else:
    print("challenged" if sock.recv(64) else "closed")
"""


def _probe_as(user: pwd.struct_passwd, socket_path: str) -> str:
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else None
    if python is None:
        pytest.skip("a system python readable by other users is needed")
    result = subprocess.run(
        [
            "runuser",
            "-u",
            user.pw_name,
            "--",
            python,
            "-c",
            PROBE,
            socket_path,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return result.stdout.strip()


@pytest.fixture
def shared_paths() -> Iterator[Paths]:
    """Paths under a folder other users may enter (tmp_path is private)."""
    base = tempfile.mkdtemp(prefix="dynaconn-peer-", dir="/tmp")
    os.chmod(base, 0o755)
    try:
        yield {
            "socket": os.path.join(base, "run", "dynaconnd.sock"),
            "authkey_file": os.path.join(base, "run", "authkey"),
            "data_dir": os.path.join(base, "data"),
        }
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_other_users_cannot_reach_the_socket_folder(
    other_user: pwd.struct_passwd, shared_paths: Paths
) -> None:
    """The 0700 folder stops another user at connect()."""
    server = ServerProcess(**shared_paths).start()
    try:
        assert "denied" == _probe_as(other_user, shared_paths["socket"])
    finally:
        server.stop()


def test_peer_of_another_user_is_refused_even_if_modes_are_open(
    other_user: pwd.struct_passwd, shared_paths: Paths
) -> None:
    """With the modes opened by mistake, SO_PEERCRED still turns them away."""
    server = ServerProcess(**shared_paths).start()
    try:
        os.chmod(os.path.dirname(shared_paths["socket"]), 0o755)
        os.chmod(shared_paths["socket"], 0o666)

        assert "closed" == _probe_as(other_user, shared_paths["socket"])

        (event,) = server.wait_event("client.rejected")
        assert "peer" == event["reason"]
        assert other_user.pw_uid == event["uid"]
        key = read_authkey(shared_paths["authkey_file"])
        assert ["main"] == raw_call(shared_paths["socket"], key, "names")
    finally:
        server.stop()


def test_member_of_the_allowed_group_is_served(
    other_user: pwd.struct_passwd, shared_paths: Paths
) -> None:
    """A member of allowed_gid gets through the modes and the peer check."""
    server = ServerProcess(
        **shared_paths, allowed_gid=other_user.pw_gid
    ).start()
    try:
        assert "challenged" == _probe_as(other_user, shared_paths["socket"])
        assert [] == server.named("client.rejected")
    finally:
        server.stop()


def test_server_keeps_serving_many_clients_at_once(
    server: ServerProcess, paths: Paths
) -> None:
    """Concurrent clients each get their own answers."""
    key = read_authkey(paths["authkey_file"])
    results: list[Any] = []

    def call() -> None:
        results.append(raw_call(paths["socket"], key, "names"))

    threads = [
        threading.Thread(target=call, name=f"test-client-{index}")
        for index in range(16)
    ]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert [["main"]] * 16 == results
    assert time.monotonic() - started < 10
