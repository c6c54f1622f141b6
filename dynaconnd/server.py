"""The daemon's Unix-socket server: one service object, plain replies.

It is a ``multiprocessing.managers`` server, so any client speaks the
stdlib's wire format (an HMAC challenge on the authkey, then pickled
``(ident, method, args, kwargs)`` requests).  Three guards stand in
front of the service:

- the socket's folder and file modes (0700/0600, or 0750/0660 for a
  client group), checked by the kernel at ``connect()``;
- the peer's credentials (``SO_PEERCRED``): the daemon's own user, root
  and members of the client group are served, anyone else is turned
  away before a byte is read;
- the authkey: whoever answers the challenge is trusted as the daemon's
  own user (requests are pickles), so the key file is kept private.

The service is registered once under a fixed id
(``protocol.SERVICE_IDENT``) rather than created per client, so a client
needs one connection and no reference counting.  The stdlib's server
runs each connection in its own thread: service methods must be safe to
call concurrently.
"""

from __future__ import annotations

import contextlib
import grp
import itertools
import os
import pwd
import secrets
import socket
import stat
import struct
import tempfile
import threading
import time
import traceback
from multiprocessing import AuthenticationError, connection, managers
from multiprocessing.reduction import ForkingPickler
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from dynaconnd.errors import (
    InsecureFileError,
    SocketInUseError,
)
from dynaconnd.logs import get_logger
from dynaconnd.protocol import MAX_MESSAGE_BYTES, SERVICE_IDENT

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

__all__ = [
    "AUTHKEY_MODE",
    "FOLDER_MODE",
    "GROUP_AUTHKEY_MODE",
    "GROUP_FOLDER_MODE",
    "GROUP_SOCKET_MODE",
    "SOCKET_MODE",
    "InsecureFileError",
    "SocketInUseError",
    "SocketServer",
    "default_authkey_path",
    "default_runtime_dir",
    "default_socket_path",
    "load_or_create_authkey",
    "read_authkey",
]

log = get_logger("server")

#: The socket when only the daemon's own user (and root) may connect.
SOCKET_MODE = 0o600
#: The socket when a client group may connect too.
GROUP_SOCKET_MODE = 0o660
#: The socket's folder, without and with a client group.
FOLDER_MODE = 0o700
GROUP_FOLDER_MODE = 0o750
#: The authkey file, without and with a client group.
AUTHKEY_MODE = 0o600
GROUP_AUTHKEY_MODE = 0o640

#: Random bytes in a new authkey; shorter existing keys are refused.
AUTHKEY_BYTES = 32
MIN_AUTHKEY_BYTES = 16

#: A peer must finish the authkey handshake within this many seconds.
HANDSHAKE_TIMEOUT = 5.0
#: A reply that cannot be sent within this many seconds ends the client.
SEND_TIMEOUT = 30.0
#: Connections served at once; more are turned away, not queued.
MAX_CONNECTIONS = 1024
#: Repeated refusals of one (reason, uid) are logged at most this often.
REJECTION_LOG_INTERVAL = 10.0
#: stop() waits this long for connection threads to finish a call.
STOP_TIMEOUT = 5.0

_SOCKET_NAME = "dynaconnd.sock"
_AUTHKEY_NAME = "authkey"
_PEERCRED = struct.Struct("3i")
_TIMEVAL = struct.Struct("@ll")


# -- paths and keys ---------------------------------------------------------


def _env(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def default_runtime_dir(environ: Mapping[str, str] | None = None) -> str:
    """Return the folder of the socket, from systemd or the session."""
    env = _env(environ)
    runtime = env.get("RUNTIME_DIRECTORY")
    if runtime:
        # systemd lists one path per RuntimeDirectory= entry.
        return runtime.split(":")[0]
    xdg = env.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "dynaconnd")
    return "/run/dynaconnd"


def default_socket_path(environ: Mapping[str, str] | None = None) -> str:
    """Return ``$DYNACONN_SOCKET`` or the socket in the runtime folder."""
    env = _env(environ)
    return env.get("DYNACONN_SOCKET") or os.path.join(
        default_runtime_dir(env), _SOCKET_NAME
    )


def default_authkey_path(environ: Mapping[str, str] | None = None) -> str:
    """Return ``$DYNACONN_AUTHKEY_FILE`` or the key in the runtime folder."""
    env = _env(environ)
    return env.get("DYNACONN_AUTHKEY_FILE") or os.path.join(
        default_runtime_dir(env), _AUTHKEY_NAME
    )


def read_authkey(path: str) -> bytes:
    """Return the key in ``path``; refuse one that others could read."""
    with open(path, "rb") as handle:
        mode = os.fstat(handle.fileno()).st_mode
        if mode & (stat.S_IRWXO | stat.S_IWGRP):
            raise InsecureFileError(
                f"authkey file {path} has mode {stat.S_IMODE(mode):04o};"
                f" it must not be readable or writable by others"
                f" (chmod {AUTHKEY_MODE:o} or {GROUP_AUTHKEY_MODE:o})"
            )
        key = handle.read(4096)
    if len(key) < MIN_AUTHKEY_BYTES:
        raise InsecureFileError(
            f"authkey file {path} holds {len(key)} bytes;"
            f" at least {MIN_AUTHKEY_BYTES} are needed"
        )
    return key


def load_or_create_authkey(
    path: str, *, group_readable: bool = False, gid: int | None = None
) -> bytes:
    """Return the key in ``path``, creating a random one if it is missing.

    A new key is mode 0600, or 0640 when ``group_readable`` (owned by
    ``gid`` when given).  It appears under its name complete or not at
    all, and never replaces a key another process created meanwhile.
    """
    with contextlib.suppress(FileNotFoundError):
        return read_authkey(path)

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, mode=FOLDER_MODE, exist_ok=True)
    mode = GROUP_AUTHKEY_MODE if group_readable else AUTHKEY_MODE
    key = secrets.token_bytes(AUTHKEY_BYTES)
    fd, temp = tempfile.mkstemp(dir=folder, prefix=".", suffix=".key-tmp")
    try:
        os.fchmod(fd, mode)
        if gid is not None:
            os.fchown(fd, -1, gid)
        os.write(fd, key)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        # link() fails if the name exists, where rename() would replace
        # a key that a second daemon started at the same moment made.
        try:
            os.link(temp, path)
        except FileExistsError:
            return read_authkey(path)
    finally:
        if fd != -1:
            os.close(fd)
        os.unlink(temp)
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    log.info("authkey.created", path=path, mode=f"{mode:04o}")
    return key


# -- connections ------------------------------------------------------------


class _Peer(NamedTuple):
    pid: int
    uid: int
    gid: int


def _timeval(seconds: float | None) -> bytes:
    if not seconds:
        return _TIMEVAL.pack(0, 0)
    whole = int(seconds)
    return _TIMEVAL.pack(whole, int((seconds - whole) * 1_000_000))


class _GuardedConnection:
    """A stdlib ``Connection`` with bounded reads, timeouts and shutdown.

    ``Connection.recv()`` believes any length header, and its file
    descriptor cannot be shut down or given timeouts; a duplicate of
    the descriptor as a ``socket`` gives both without touching the
    stdlib's object.
    """

    def __init__(self, conn: connection.Connection) -> None:
        self._conn = conn
        self._sock = socket.socket(fileno=os.dup(conn.fileno()))
        self._lock = threading.Lock()
        self.too_large = False

    def peer(self) -> _Peer:
        creds = self._sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size
        )
        return _Peer(*_PEERCRED.unpack(creds))

    def set_timeouts(self, *, recv: float | None, send: float | None) -> None:
        # The stdlib reads with os.read(), which honours SO_RCVTIMEO
        # (EAGAIN, an OSError) but not socket.settimeout().
        self._sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(recv)
        )
        self._sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(send)
        )

    def recv(self) -> Any:
        try:
            data = self._conn.recv_bytes(MAX_MESSAGE_BYTES)
        except OSError:
            # Too large, timed out or reset: the stream is out of step
            # either way, so this client is done.
            self.too_large = not self._conn.readable
            self.shutdown()
            raise EOFError from None
        return ForkingPickler.loads(data)

    def send(self, obj: Any) -> None:
        self._conn.send(obj)

    def recv_bytes(self, maxlength: int | None = None) -> bytes:
        return self._conn.recv_bytes(maxlength)

    def send_bytes(self, data: bytes) -> None:
        self._conn.send_bytes(data)

    def fileno(self) -> int:
        return self._conn.fileno()

    def shutdown(self) -> None:
        """Wake a thread blocked on this connection; it sees EOF."""
        with self._lock, contextlib.suppress(OSError):
            if self._sock.fileno() != -1:
                self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
            self._sock.close()


class _ManagerServer(managers.Server):
    """``multiprocessing.managers.Server`` with a guarded front door.

    The stdlib server authenticates inside ``_handle_request`` and, on a
    wrong key, sends the peer a traceback and logs nothing; it cannot
    check who the peer is.  So the accept loop and the first request are
    ours; ``serve_client``, the per-connection request loop, is the
    stdlib's.
    """

    # Clients need "accept_connection" (turn this connection into one
    # that calls the service) and "dummy" (BaseManager.connect's probe).
    # The stdlib also offers shutdown, create, incref, decref and debug
    # calls; none has a use here and "shutdown" would stop the server.
    public = ["accept_connection", "dummy"]

    # Without "#GETVALUE", which would pickle the service object itself.
    fallback_mapping = {
        name: function
        for name, function in managers.Server.fallback_mapping.items()
        if name != "#GETVALUE"
    }

    def __init__(
        self,
        owner: SocketServer,
        service: object,
        *,
        address: str,
        authkey: bytes,
        exposed: Sequence[str],
    ) -> None:
        super().__init__({}, address, authkey, "pickle")
        # typeshed leaves out the attributes Server.__init__ sets.
        attributes = vars(self)
        self.guarded_listener: connection.Listener = attributes["listener"]
        self.guarded_authkey = authkey
        self._owner = owner
        # serve_forever() would make the event; we never call it (it
        # calls sys.exit() when done), but serve_client() reads it.
        self.stop_event = threading.Event()
        self.id_to_obj[SERVICE_IDENT] = (service, set(exposed), {})

    def accepter(self) -> None:
        while not self.stop_event.is_set():
            try:
                conn = self.guarded_listener.accept()
            except OSError as error:
                if self.stop_event.is_set():
                    return
                # Out of file descriptors, most likely: pause, not spin.
                self._owner.note_refusal("accept_failed", None, str(error))
                self.stop_event.wait(0.1)
                continue
            if self.stop_event.is_set():
                conn.close()
                return
            try:
                self._owner.admit(conn)
            except OSError as error:
                # No descriptor for the duplicate, or no thread: this
                # client goes, the loop stays.
                conn.close()
                self._owner.note_refusal("admit_failed", None, str(error))

    def accept_connection(self, c: Any, name: str) -> None:
        # The stdlib renames the serving thread after the client's own
        # thread; ours keep their dynaconn-... names.
        c.send(("#RETURN", None))
        self.serve_client(c)

    def serve(self, conn: _GuardedConnection) -> None:
        """Answer the first request of an authenticated connection."""
        try:
            request = conn.recv()
            _ident, funcname, args, kwds = request
            if funcname not in self.public:
                raise ValueError(f"{funcname!r} is not a server call")
            if funcname == "accept_connection":
                # Serves until the client leaves or the server stops;
                # its one reply went out before the first request.
                self.accept_connection(conn, *args, **kwds)
                return
            result = getattr(self, funcname)(conn, *args, **kwds)
            conn.send(("#RETURN", result))
        except (SystemExit, EOFError, OSError):
            # serve_client() exits its thread with sys.exit() on EOF.
            pass
        except Exception:
            with contextlib.suppress(OSError):
                conn.send(("#TRACEBACK", traceback.format_exc()))


class SocketServer:
    """Serve ``service`` on a Unix socket, in a ``dynaconn-server`` thread.

    Only the methods named in ``exposed`` can be called; each returns
    plain data.  With ``allowed_gid`` the members of that group are
    served as well as the daemon's own user and root.
    """

    def __init__(
        self,
        service: object,
        *,
        socket_path: str,
        authkey: bytes,
        allowed_gid: int | None = None,
        exposed: Sequence[str],
    ) -> None:
        self.service = service
        self.socket_path = os.path.abspath(socket_path)
        self.allowed_gid = allowed_gid
        self.exposed = tuple(exposed)
        self._authkey = authkey
        self._server: _ManagerServer | None = None
        self._accepter: threading.Thread | None = None
        self._lock = threading.Lock()
        self._connections: set[_GuardedConnection] = set()
        self._threads: set[threading.Thread] = set()
        self._counter = itertools.count(1)
        self._refusals: dict[tuple[str, int | None], tuple[float, int]] = {}

    def __repr__(self) -> str:
        return f"<SocketServer socket={self.socket_path!r}>"

    @property
    def is_serving(self) -> bool:
        """Return whether the accept loop is running."""
        return self._accepter is not None and self._accepter.is_alive()

    def start(self) -> None:
        """Bind the socket with its modes and start accepting clients."""
        if self._server is not None:
            raise RuntimeError(f"{self!r} is already started")
        group = self.allowed_gid is not None
        self._prepare_folder(GROUP_FOLDER_MODE if group else FOLDER_MODE)
        self._remove_stale_socket()
        server = _ManagerServer(
            self,
            self.service,
            address=self.socket_path,
            authkey=self._authkey,
            exposed=self.exposed,
        )
        # The folder keeps others out until the socket has its own mode.
        os.chmod(self.socket_path, GROUP_SOCKET_MODE if group else SOCKET_MODE)
        if self.allowed_gid is not None:
            os.chown(self.socket_path, -1, self.allowed_gid)
        self._server = server
        self._accepter = threading.Thread(
            target=server.accepter, name="dynaconn-server", daemon=True
        )
        self._accepter.start()
        log.info(
            "server.listening",
            socket=self.socket_path,
            allowed_gid=self.allowed_gid,
            methods=len(self.exposed),
        )

    def stop(self) -> None:
        """Stop accepting, end every connection, remove the socket file."""
        server = self._server
        if server is None:
            return
        self._server = None
        server.stop_event.set()

        # Wake the accept loop, blocked in accept(), by connecting to it.
        with (
            contextlib.suppress(OSError),
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as waker,
        ):
            waker.settimeout(1.0)
            waker.connect(self.socket_path)
        if self._accepter is not None:
            self._accepter.join(timeout=STOP_TIMEOUT)

        # Closing the listener unlinks the socket file.
        with contextlib.suppress(FileNotFoundError):
            server.guarded_listener.close()

        # Connection threads see EOF and leave once a call in progress ends.
        with self._lock:
            connections = list(self._connections)
            threads = list(self._threads)
        for conn in connections:
            conn.shutdown()
        deadline = time.monotonic() + STOP_TIMEOUT
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        left = [thread.name for thread in threads if thread.is_alive()]
        if left:
            log.warning("server.threads_left", threads=left)
        log.info("server.stopped", socket=self.socket_path)

    # -- called from the accept loop and connection threads -------------

    def admit(self, raw: connection.Connection) -> None:
        """Check a new connection's peer and serve it in its own thread."""
        conn = _GuardedConnection(raw)
        try:
            peer = conn.peer()
        except OSError:
            conn.close()
            return
        if not self._peer_allowed(peer):
            self.note_refusal("peer", peer)
            conn.close()
            return
        with self._lock:
            if len(self._connections) >= MAX_CONNECTIONS:
                full = True
            else:
                full = False
                self._connections.add(conn)
                thread = threading.Thread(
                    target=self._serve,
                    args=(conn, peer),
                    name=f"dynaconn-server-{next(self._counter)}",
                    daemon=True,
                )
                self._threads.add(thread)
        if full:
            self.note_refusal("too_many_connections", peer)
            conn.close()
            return
        thread.start()

    def note_refusal(
        self, reason: str, peer: _Peer | None, detail: str | None = None
    ) -> None:
        """Log a refused client, at most once per interval per reason/uid."""
        uid = peer.uid if peer is not None else None
        now = time.monotonic()
        key = (reason, uid)
        with self._lock:
            last, suppressed = self._refusals.get(key, (-1e9, 0))
            if now - last < REJECTION_LOG_INTERVAL:
                self._refusals[key] = (last, suppressed + 1)
                return
            self._refusals[key] = (now, 0)
        log.warning(
            "client.rejected",
            reason=reason,
            uid=uid,
            pid=peer.pid if peer is not None else None,
            suppressed=suppressed,
            detail=detail,
        )

    def _peer_allowed(self, peer: _Peer) -> bool:
        if peer.uid in (0, os.geteuid()):
            return True
        gid = self.allowed_gid
        if gid is None:
            return False
        if peer.gid == gid:
            return True
        try:
            name = pwd.getpwuid(peer.uid).pw_name
            return gid in os.getgrouplist(name, peer.gid) or (
                name in grp.getgrgid(gid).gr_mem
            )
        except KeyError:
            return False

    def _serve(self, conn: _GuardedConnection, peer: _Peer) -> None:
        server = self._server
        try:
            if server is None:
                return
            conn.set_timeouts(recv=HANDSHAKE_TIMEOUT, send=HANDSHAKE_TIMEOUT)
            # The stdlib's handshake, on our connection wrapper.
            stdlib_conn = cast("connection.Connection", conn)
            try:
                connection.deliver_challenge(
                    stdlib_conn, server.guarded_authkey
                )
                connection.answer_challenge(
                    stdlib_conn, server.guarded_authkey
                )
            except AuthenticationError:
                self.note_refusal("authkey", peer)
                return
            except (OSError, EOFError, AssertionError):
                # Gone, garbage or silent: nothing worth a warning.
                log.debug("client.dropped", uid=peer.uid, pid=peer.pid)
                return
            conn.set_timeouts(recv=None, send=SEND_TIMEOUT)
            server.serve(conn)
            if conn.too_large:
                self.note_refusal("message_too_large", peer)
        finally:
            with self._lock:
                self._connections.discard(conn)
                self._threads.discard(threading.current_thread())
            conn.close()

    def _prepare_folder(self, mode: int) -> None:
        folder = os.path.dirname(self.socket_path)
        if not os.path.isdir(folder):
            os.makedirs(folder, mode=mode, exist_ok=True)
        status = os.stat(folder)
        if status.st_uid == os.geteuid():
            os.chmod(folder, mode)
            if self.allowed_gid is not None:
                os.chown(folder, -1, self.allowed_gid)
        elif status.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise InsecureFileError(
                f"socket folder {folder} belongs to uid {status.st_uid} and"
                f" others may write to it (mode"
                f" {stat.S_IMODE(status.st_mode):04o}); use a folder of"
                f" the daemon's own, such as {default_runtime_dir()}"
            )

    def _remove_stale_socket(self) -> None:
        path = self.socket_path
        try:
            status = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(status.st_mode):
            raise SocketInUseError(
                f"{path} exists and is not a socket; refusing to replace it"
            )
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(path)
            except (ConnectionRefusedError, FileNotFoundError):
                # Left behind by a daemon that did not stop cleanly.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                log.info("server.stale_socket_removed", socket=path)
                return
            except OSError:
                pass
        raise SocketInUseError(
            f"another process is serving on {path}; stop it first"
        )
