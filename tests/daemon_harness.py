"""The real daemon and real client processes, driven by tests.

``DaemonProcess`` runs ``python -m dynaconnd`` as a subprocess in a
folder of its own (``etc/source.ini``, ``run/dynaconnd.sock``,
``run/authkey``, ``state/``) with JSON logs, and a reader thread
(``dynaconn-test-reader``) parses every line of its output as it comes.
Tests wait for events with a deadline and assert on them as dicts::

    with DaemonProcess(tmp_path / "d", ini=text) as daemon:
        mark = daemon.mark()
        daemon.save_config(new_text)
        event = daemon.wait_event("reload.applied", after=mark)
        assert ["crm"] == event["changed"]
        registry = daemon.client()        # closed with the daemon

``ClientProcess`` runs this module as a script: a client of the daemon
in another process, answering one JSON request per line on its
standard input (see ``_Agent`` for the operations).  Its own log events
(``client.daemon_unavailable``...) are parsed from its standard error.

Both kill their process and join their reader threads on ``close()``,
so a test that uses them as context managers (or through a fixture)
leaks nothing, even when it fails.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import platform
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping, Sequence
    from types import TracebackType

    from magenta_dynaconn._remote import RemoteRegistry

__all__ = [
    "DENY_INOTIFY",
    "NO_SECCOMP",
    "START_TIMEOUT",
    "STEP_TIMEOUT",
    "STOP_TIMEOUT",
    "AgentError",
    "ClientProcess",
    "DaemonFactory",
    "DaemonProcess",
    "clean_environment",
    "inotify_can_be_denied",
    "sqlite_section",
    "start_dynaconnd",
    "write_atomically",
]

#: Start-up imports SQLAlchemy and the drivers: allow a slow machine.
START_TIMEOUT = 30.0
#: The default deadline for one awaited event or reply.
STEP_TIMEOUT = 15.0
#: How long a stopped daemon may take to exit.
STOP_TIMEOUT = 15.0

_READER_NAME = "dynaconn-test-reader"
_ROOT = Path(__file__).resolve().parent.parent

# Variables a systemd unit or the developer's shell may set that would
# point the daemon or a client somewhere else.
_FOREIGN_VARIABLES = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "RUNTIME_DIRECTORY",
    "STATE_DIRECTORY",
    "CREDENTIALS_DIRECTORY",
    "DYNACONN_SOCKET",
    "DYNACONN_AUTHKEY_FILE",
)

# A wrapper to pass as ``DaemonProcess(wrapper=...)``: it installs a
# seccomp filter under which inotify_init() and inotify_init1() fail
# with EMFILE, as when fs.inotify.max_user_instances is reached, then
# runs the daemon.  The kernel really refuses; nothing is patched.
DENY_INOTIFY = """\
import ctypes, errno, platform, runpy, struct, sys
ARCHES = {"x86_64": (0xC000003E, (294, 253)), "aarch64": (0xC00000B7, (26,))}
arch, numbers = ARCHES[platform.machine()]
def op(code, k, jt=0, jf=0):
    return struct.pack("HBBI", code, jt, jf, k)
LOAD, JEQ, RET = 0x20, 0x15, 0x06
program = [op(LOAD, 4), op(JEQ, arch, 0, len(numbers) + 1), op(LOAD, 0)]
for index, number in enumerate(numbers):
    program.append(op(JEQ, number, len(numbers) - index, 0))
program += [op(RET, 0x7FFF0000), op(RET, 0x00050000 | errno.EMFILE)]
code = b"".join(program)
buffer = ctypes.create_string_buffer(code, len(code))
class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
prog = Prog(len(program), ctypes.addressof(buffer))
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(38, 1, 0, 0, 0) or libc.prctl(22, 2, ctypes.byref(prog)):
    sys.exit(77)
sys.argv = sys.argv[1:]
runpy.run_module("dynaconnd", run_name="__main__", alter_sys=True)
"""

#: The exit status of ``DENY_INOTIFY`` when seccomp is not available.
NO_SECCOMP = 77


def inotify_can_be_denied() -> bool:
    """Return whether ``DENY_INOTIFY`` knows this machine's syscalls."""
    return sys.platform == "linux" and platform.machine() in {
        "x86_64",
        "aarch64",
    }


def clean_environment(**extra: str) -> dict[str, str]:
    """Return this process's environment without systemd's variables."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in _FOREIGN_VARIABLES
    }
    # The daemon and the agents import the checkout, installed or not.
    env["PYTHONPATH"] = os.pathsep.join(
        [str(_ROOT), str(_ROOT / "client"), env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    env.update(extra)
    return env


def write_atomically(path: Path, data: str | bytes) -> None:
    """Save ``data`` to ``path`` as editors do: temp file, then rename."""
    raw = data.encode() if isinstance(data, str) else data
    temp = path.with_name(f".{path.name}.tmp")
    with open(temp, "wb") as handle:
        handle.write(raw)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)


def sqlite_section(folder: Path, name: str, *, extra: str = "") -> str:
    """Create SQLite database ``name`` in ``folder``; return its section.

    The database has a ``customer(id, name)`` table, so that it has a
    schema to reflect and the health probe, which never creates a
    file, finds it.  ``extra`` lines are added to the section.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as connection:
        connection.execute(
            "CREATE TABLE IF NOT EXISTS customer"
            " (id INTEGER PRIMARY KEY, name TEXT)"
        )
        connection.commit()
    return f"[{name}]\nsource = sqlite\nbase = {path}\n{extra}\n"


def _matches(event: dict[str, Any], name: str | None, fields: Any) -> bool:
    if name is not None and event.get("event") != name:
        return False
    return all(event.get(key) == value for key, value in fields.items())


class _LineReader:
    """Read a pipe line by line in a thread; keep JSON events and text."""

    def __init__(
        self,
        stream: IO[bytes],
        *,
        on_line: Callable[[str], bool] | None = None,
    ) -> None:
        self.events: list[dict[str, Any]] = []
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self._stream = stream
        self._on_line = on_line
        self._thread = threading.Thread(
            target=self._run, name=_READER_NAME, daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        for raw in iter(self._stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if self._on_line is not None and self._on_line(line):
                continue
            try:
                parsed = json.loads(line)
            except ValueError:
                parsed = None
            with self.changed:
                self.lines.append(line)
                if isinstance(parsed, dict) and "event" in parsed:
                    self.events.append(parsed)
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    @property
    def is_open(self) -> bool:
        """Return whether the pipe may still deliver lines."""
        return self._thread.is_alive()

    def join(self, timeout: float = STOP_TIMEOUT) -> None:
        """Wait for the end of the pipe (the process has exited)."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError("the output reader did not reach EOF")
        self._stream.close()

    def tail(self, count: int = 40) -> str:
        """Return the last ``count`` lines, for failure messages."""
        with self.changed:
            return "\n".join(self.lines[-count:])


class DaemonProcess:
    """One ``dynaconnd`` subprocess in ``folder``, with its events parsed.

    ``ini`` is written to ``folder/etc/source.ini`` before the start;
    pass ``config`` instead to start on a file (or symlink) the test
    laid out itself.  ``args`` are appended to the command line, so
    they override the defaults (a later ``--debounce`` wins).
    ``wrapper`` is Python code run with ``-c`` in place of ``-m``; it
    gets ``dynaconnd``'s arguments after its own ``sys.argv[0]``.
    ``prefix`` goes before the interpreter (``setpriv ... --``, say).
    ``state_dir`` is ``folder/state`` by default: pass a folder of the
    test's own, or ``None`` to start without ``--state-dir``.
    ``env`` replaces the whole environment (see ``clean_environment``).
    """

    def __init__(
        self,
        folder: Path,
        *,
        ini: str | None = None,
        config: Path | None = None,
        args: Sequence[str] = (),
        log_level: str = "info",
        wrapper: str | None = None,
        prefix: Sequence[str] = (),
        state_dir: Path | Literal["default"] | None = "default",
        env: dict[str, str] | None = None,
    ) -> None:
        self.folder = folder
        self.config = config or folder / "etc" / "source.ini"
        self.socket = str(folder / "run" / "dynaconnd.sock")
        self.authkey_file = str(folder / "run" / "authkey")
        if isinstance(state_dir, str):
            state_dir = folder / "state"
        self.state_dir = state_dir
        self.args = tuple(args)
        self.log_level = log_level
        self.wrapper = wrapper
        self.prefix = tuple(prefix)
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self._reader: _LineReader | None = None
        # Events and output of earlier runs, so a restarted daemon keeps
        # its past.
        self._past: list[dict[str, Any]] = []
        self._past_lines: list[str] = []
        self._clients: list[RemoteRegistry] = []
        self.config.parent.mkdir(parents=True, exist_ok=True)
        if ini is not None:
            self.config.write_text(ini)

    def __repr__(self) -> str:
        pid = None if self.process is None else self.process.pid
        return f"<DaemonProcess pid={pid} socket={self.socket!r}>"

    def __enter__(self) -> DaemonProcess:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- the process -----------------------------------------------------

    @property
    def argv(self) -> list[str]:
        """Return the command line that starts this daemon."""
        head = ["-m"] if self.wrapper is None else ["-c", self.wrapper]
        state = []
        if self.state_dir is not None:
            state = ["--state-dir", str(self.state_dir)]
        return [
            *self.prefix,
            sys.executable,
            *head,
            "dynaconnd",
            "--config",
            str(self.config),
            "--socket",
            self.socket,
            "--authkey-file",
            self.authkey_file,
            *state,
            "--log-format",
            "json",
            "--log-level",
            self.log_level,
            "--debounce",
            "100ms",
            *self.args,
        ]

    @property
    def pid(self) -> int:
        """Return the process id of the running daemon."""
        assert self.process is not None, f"{self!r} was never started"
        return self.process.pid

    def start(
        self, *, wait_ready: bool = True, timeout: float = START_TIMEOUT
    ) -> DaemonProcess:
        """Start the daemon (again); wait for ``daemon.ready`` by default."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"{self!r} is already running")
        self._retire_reader()
        self.process = subprocess.Popen(
            self.argv,
            env=self.env or clean_environment(),
            cwd=self.folder,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert self.process.stdout is not None
        self._reader = _LineReader(self.process.stdout)
        if wait_ready:
            self.wait_event(
                "daemon.ready", after=len(self._past), timeout=timeout
            )
        return self

    def restart(self, *, timeout: float = START_TIMEOUT) -> DaemonProcess:
        """Stop with SIGTERM (status 0 expected), then start again."""
        status = self.stop()
        assert 0 == status, self.tail()
        return self.start(timeout=timeout)

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` to the daemon."""
        assert self.process is not None, f"{self!r} was never started"
        self.process.send_signal(signum)

    def stop(
        self, signum: int = signal.SIGTERM, *, timeout: float = STOP_TIMEOUT
    ) -> int:
        """Send ``signum``, wait for the exit; return the exit status."""
        self.send_signal(signum)
        return self.wait_exit(timeout=timeout)

    def wait_exit(self, *, timeout: float = STOP_TIMEOUT) -> int:
        """Wait for the daemon to exit; return its status."""
        assert self.process is not None, f"{self!r} was never started"
        try:
            status = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"dynaconnd did not exit within {timeout}s; output:\n"
                + self.tail()
            ) from None
        if self._reader is not None:
            self._reader.join()
        return status

    def is_running(self) -> bool:
        """Return whether the daemon process is alive."""
        return self.process is not None and self.process.poll() is None

    def client(self, **options: Any) -> RemoteRegistry:
        """Connect a client in this process; it is closed with the daemon."""
        from magenta_dynaconn import DatabaseRegistry

        registry: RemoteRegistry
        if options:
            from magenta_dynaconn._remote import RemoteRegistry

            registry = RemoteRegistry(
                self.socket, self.authkey_file, **options
            )
        else:
            registry = DatabaseRegistry.connect(self.socket, self.authkey_file)
        self._clients.append(registry)
        return registry

    def client_process(self) -> ClientProcess:
        """Start a client in another process; close it yourself."""
        return ClientProcess(self.socket, self.authkey_file, cwd=self.folder)

    def save_config(self, text: str | bytes) -> None:
        """Replace source.ini by temp file and rename."""
        write_atomically(self.config, text)

    def close(self) -> None:
        """Close clients, kill the daemon if it runs, join the reader."""
        clients, self._clients = self._clients, []
        for registry in clients:
            registry.close()
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT)
        self._retire_reader()

    def _retire_reader(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.join()
            self._past.extend(reader.events)
            self._past_lines.extend(reader.lines)

    # -- events ----------------------------------------------------------

    def _all_events(self) -> list[dict[str, Any]]:
        reader = self._reader
        if reader is None:
            return list(self._past)
        with reader.changed:
            return [*self._past, *reader.events]

    def mark(self) -> int:
        """Return a position in the event list, for ``after=``."""
        return len(self._all_events())

    def events(
        self, name: str | None = None, *, after: int = 0, **fields: Any
    ) -> list[dict[str, Any]]:
        """Return the events logged so far named ``name`` with ``fields``.

        ``fields`` must all be equal (``**{"from": "up"}`` for keywords).
        """
        return [
            event
            for event in self._all_events()[after:]
            if _matches(event, name, fields)
        ]

    def wait_event(
        self,
        name: str,
        *,
        after: int = 0,
        timeout: float = STEP_TIMEOUT,
        **fields: Any,
    ) -> dict[str, Any]:
        """Return the first event from ``after`` on that fits; wait for it.

        Fails at once, with the daemon's output, if the daemon exits
        before logging it.
        """
        deadline = time.monotonic() + timeout
        while True:
            found = self.events(name, after=after, **fields)
            if found:
                return found[0]
            reader = self._reader
            if reader is None or not reader.is_open:
                raise AssertionError(
                    f"dynaconnd ended without logging {name} {fields};"
                    f" status {self.process and self.process.poll()};"
                    f" output:\n{self.tail()}"
                )
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {name}"
                    f" {fields}; output:\n{self.tail()}"
                )
            with reader.changed:
                reader.changed.wait(min(left, 0.5))

    def tail(self, count: int = 40) -> str:
        """Return the end of the current run's output."""
        return "" if self._reader is None else self._reader.tail(count)

    def output(self) -> str:
        """Return everything every run has written so far."""
        lines = list(self._past_lines)
        reader = self._reader
        if reader is not None:
            with reader.changed:
                lines += reader.lines
        return "\n".join(lines)

    def cli_argv(self, *argv: str) -> list[str]:
        """Return ``argv`` for ``dynaconn``, pointed at this daemon."""
        socket = ["--socket", self.socket]
        return [*socket, "--authkey-file", self.authkey_file, *argv]


class AgentError(Exception):
    """A call in a ``ClientProcess`` raised; the reply says what."""

    def __init__(self, reply: dict[str, Any]) -> None:
        self.reply = reply
        self.error_class: str = reply["error_class"]
        self.elapsed: float = reply["elapsed"]
        super().__init__(f"{self.error_class}: {reply['error']}")


class ClientProcess:
    """A ``DatabaseRegistry.connect()`` client in a process of its own.

    Requests are answered in order; ``request(op, **fields)`` returns
    the reply dict, ``call(method, *args)`` the result of a registry
    method (raising ``AgentError`` when it raised).
    """

    def __init__(
        self, socket: str, authkey_file: str, *, cwd: Path | None = None
    ) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.daemon_harness",
                socket,
                authkey_file,
            ],
            env=clean_environment(),
            cwd=cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.process.stdout is not None
        assert self.process.stderr is not None
        self._replies: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self._out = _LineReader(self.process.stdout, on_line=self._reply)
        self._err = _LineReader(self.process.stderr)

    def __enter__(self) -> ClientProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _reply(self, line: str) -> bool:
        try:
            reply = json.loads(line)
        except ValueError:
            return False
        if not isinstance(reply, dict) or "reply" not in reply:
            return False
        self._replies.put(reply)
        return True

    def request(
        self, op: str, *, timeout: float = STEP_TIMEOUT, **fields: Any
    ) -> dict[str, Any]:
        """Send one request and return its reply."""
        assert self.process.stdin is not None
        line = json.dumps({"op": op, **fields}) + "\n"
        self.process.stdin.write(line.encode())
        self.process.stdin.flush()
        try:
            return self._replies.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"the client process did not answer {op} within"
                f" {timeout}s; stderr:\n{self._err.tail()}"
            ) from None

    def call(
        self, method: str, *args: Any, timeout: float = STEP_TIMEOUT
    ) -> Any:
        """Call ``registry.<method>(*args)`` there; return the result."""
        reply = self.request(
            "call", method=method, args=list(args), timeout=timeout
        )
        if not reply["ok"]:
            raise AgentError(reply)
        return reply["result"]

    def sql(
        self, database: str, sql: str, *, commit: bool = False
    ) -> list[list[Any]]:
        """Run ``sql`` in a new session on ``database``; return the rows."""
        reply = self.request("sql", database=database, sql=sql, commit=commit)
        if not reply["ok"]:
            raise AgentError(reply)
        rows: list[list[Any]] = reply["result"]
        return rows

    def log_events(self, name: str | None = None) -> list[dict[str, Any]]:
        """Return the client's own log events named ``name``."""
        with self._err.changed:
            return [
                event
                for event in self._err.events
                if _matches(event, name, {})
            ]

    def close(self) -> None:
        """Ask the client to leave; kill it if it does not; join readers."""
        with contextlib.suppress(OSError, ValueError):
            assert self.process.stdin is not None
            self.process.stdin.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT)
        self._out.join()
        self._err.join()


# -- the client agent: runs in the client process ---------------------------


class _Agent:
    """Answer requests with a daemon-backed registry.

    Operations (fields besides ``op``):

    - ``call``: ``method``, ``args``: ``registry.<method>(*args)``, or
      the value of a property when it takes no arguments;
    - ``sql``: ``database``, ``sql``, ``commit``: run in a new session;
    - ``begin``: ``database``, ``sql``: run in a session kept open,
      inside its transaction; ``commit`` commits and closes it;
    - ``engine_id``: ``database``: ``id()`` of a new session's engine;
    - ``wait_generation``: ``above``, ``seconds``: poll the generation
      until it is above ``above``;
    - ``fork``: ``database``, ``calls``: fork; parent and child each
      make ``calls`` daemon calls and a query at the same time.

    Every reply has ``ok``, ``elapsed`` and either ``result`` or
    ``error_class`` and ``error``.
    """

    def __init__(self, socket: str, authkey_file: str) -> None:
        from magenta_dynaconn import DatabaseRegistry

        self.registry = DatabaseRegistry.connect(socket, authkey_file)
        self.held: Any = None

    def handle(self, request: dict[str, Any]) -> Any:
        op = request["op"]
        handler = getattr(self, f"op_{op}")
        return handler(request)

    def op_call(self, request: dict[str, Any]) -> Any:
        value = getattr(self.registry, request["method"])
        return value(*request["args"]) if callable(value) else value

    def op_sql(self, request: dict[str, Any]) -> Any:
        import sqlalchemy as sa

        with self.registry.new_session(request["database"]) as session:
            rows = session.execute(sa.text(request["sql"]))
            result = [list(row) for row in rows] if rows.returns_rows else []
            if request.get("commit"):
                session.commit()
            return result

    def op_begin(self, request: dict[str, Any]) -> Any:
        import sqlalchemy as sa

        self.held = self.registry.new_session(request["database"])
        self.held.execute(sa.text(request["sql"]))
        return id(self.held.get_bind())

    def op_commit(self, request: dict[str, Any]) -> Any:
        held, self.held = self.held, None
        try:
            held.commit()
        finally:
            held.close()
        return id(held.get_bind())

    def op_engine_id(self, request: dict[str, Any]) -> Any:
        with self.registry.new_session(request["database"]) as session:
            return id(session.get_bind())

    def op_wait_generation(self, request: dict[str, Any]) -> Any:
        deadline = time.monotonic() + request["seconds"]
        while time.monotonic() < deadline:
            generation = self.registry.generation
            if generation > request["above"]:
                return generation
            time.sleep(0.01)
        raise TimeoutError(f"generation stayed at {generation}")

    def op_fork(self, request: dict[str, Any]) -> Any:
        import sqlalchemy as sa

        def work() -> list[Any]:
            outcomes = [
                self.registry.last_outcome()["generation"]
                for _ in range(request["calls"])
            ]
            with self.registry.new_session(request["database"]) as session:
                value = session.execute(sa.text("SELECT 1")).scalar()
            return [sorted(set(outcomes)), value]

        reader, writer = os.pipe()
        pid = os.fork()
        if pid == 0:
            status = 0
            try:
                os.close(reader)
                os.write(writer, json.dumps(work()).encode())
            except BaseException:
                status = 1
            finally:
                os._exit(status)
        os.close(writer)
        mine = work()
        with os.fdopen(reader, "rb") as pipe:
            theirs = pipe.read()
        _pid, status = os.waitpid(pid, 0)
        return {
            "parent": mine,
            "child": json.loads(theirs) if theirs else None,
            "child_status": os.waitstatus_to_exitcode(status),
        }


def _serve(socket: str, authkey_file: str) -> None:
    """Run the client agent: one JSON request per line, one reply each."""
    from dynaconnd.logs import configure_logging

    # Replies go to standard output; the client's own events to stderr.
    configure_logging(fmt="json", level="info", stream=sys.stderr)
    agent = _Agent(socket, authkey_file)
    for line in sys.stdin:
        request = json.loads(line)
        started = time.monotonic()
        reply: dict[str, Any] = {"reply": request["op"]}
        try:
            result = agent.handle(request)
        except Exception as error:
            reply.update(
                ok=False,
                error_class=type(error).__name__,
                error=str(error),
            )
        else:
            reply.update(ok=True, result=result)
        reply["elapsed"] = time.monotonic() - started
        print(json.dumps(reply, default=repr), flush=True)
    agent.registry.close()


class DaemonFactory:
    """Start daemons in folders under ``root``; close them all at the end.

    Tests get one per test as the ``daemons`` fixture (tests/conftest.py).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._daemons: list[DaemonProcess] = []
        self._clients: list[ClientProcess] = []

    def __enter__(self) -> DaemonFactory:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def create(self, name: str = "daemon", **options: Any) -> DaemonProcess:
        """Return a daemon in ``root/name``, not started yet."""
        daemon = DaemonProcess(self.root / name, **options)
        self._daemons.append(daemon)
        return daemon

    def start(self, name: str = "daemon", **options: Any) -> DaemonProcess:
        """Start a daemon in ``root/name`` and wait until it is ready."""
        return self.create(name, **options).start()

    def client_process(self, daemon: DaemonProcess) -> ClientProcess:
        """Start a client of ``daemon`` in another process."""
        client = daemon.client_process()
        self._clients.append(client)
        return client

    def close(self) -> None:
        """Close every client process, then every daemon."""
        for client in self._clients:
            client.close()
        for daemon in self._daemons:
            daemon.close()


@pytest.fixture
def start_dynaconnd(
    tmp_path: Path,
) -> Iterator[Callable[..., DaemonProcess]]:
    """Yield ``start(ini, *, args=(), env=None)``, which returns a daemon.

    Each daemon runs in a folder of its own under ``tmp_path``, with
    ``--debounce 50ms``, no state folder and ``env`` added to a clean
    environment; ``start`` returns once it is ready.  Every daemon is
    killed after the test.
    """
    names = (f"daemon{number}" for number in itertools.count())
    with DaemonFactory(tmp_path) as factory:

        def start(
            ini: str,
            *,
            args: Sequence[str] = (),
            env: Mapping[str, str] | None = None,
        ) -> DaemonProcess:
            return factory.start(
                next(names),
                ini=ini,
                args=["--debounce", "50ms", *args],
                state_dir=None,
                env=clean_environment(**(env or {})),
            )

        yield start


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2])
