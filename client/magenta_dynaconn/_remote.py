"""``DatabaseRegistry.connect()``: a registry that dynaconnd keeps current.

The daemon hands out plain data: connection specs and table
descriptions.  Engines, sessions and ORM classes are built here, in the
app's own process, so queries never pass through the daemon.

Before each session the client compares the daemon's generation file
(a shared memory mapping) with what it last saw: no socket round trip.
Only on a change does it fetch every spec in one call and rebuild the
databases whose spec changed.  While the daemon is down the client
serves what it has; a call that needs the daemon fails within the
connect timeout, and the next one reconnects.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import struct
import threading
import time
import weakref
from multiprocessing import AuthenticationError, connection, managers
from multiprocessing.reduction import ForkingPickler
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy.orm import Session

from dynaconnd.engines import build_engine
from dynaconnd.errors import (
    DynaconnError,
    RegistryUnavailableError,
)
from dynaconnd.genfile import GenerationReader, generation_path
from dynaconnd.logs import get_logger
from dynaconnd.protocol import (
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    SERVICE_IDENT,
    check_protocol,
    spec_from_wire,
)
from dynaconnd.registry import unknown_database
from dynaconnd.server import (
    InsecureFileError,
    default_authkey_path,
    default_socket_path,
    read_authkey,
)
from magenta_dynaconn._models import ModelFactory
from magenta_dynaconn._scope import SessionScopeMixin

if TYPE_CHECKING:
    import mmap
    from collections.abc import Mapping

    import sqlalchemy as sa

    from dynaconnd.spec import DatabaseSpec

__all__ = [
    "CALL_TIMEOUT",
    "CONNECT_TIMEOUT",
    "DATABASE_CALL_TIMEOUT",
    "RELOAD_TIMEOUT",
    "RemoteRegistry",
]

log = get_logger("client")

#: Seconds to reach the daemon and agree on the protocol.
CONNECT_TIMEOUT = 2.0
#: Seconds an ordinary call may take once connected: the daemon answers
#: these from memory, so a longer wait means it is frozen or gone.
CALL_TIMEOUT = 2.0
#: Seconds for calls that may touch a database first (a probe, or a
#: reflection of a table the daemon has not seen yet).
DATABASE_CALL_TIMEOUT = 10.0
#: Seconds for calls that reload: the daemon proves new engines first.
RELOAD_TIMEOUT = 90.0
#: Without a generation file, ask the daemon at most this often.
POLL_INTERVAL = 1.0
#: After a failed refresh, wait this long before trying again; the wait
#: doubles up to MAX_RETRY_INTERVAL while the daemon stays away.
RETRY_INTERVAL = 0.5
MAX_RETRY_INTERVAL = 8.0
#: Reconnection events are logged at most this often.
EVENT_INTERVAL = 30.0
#: How often the watcher thread checks the generation file in full.
WATCH_INTERVAL = 0.25

_TIMEVAL = struct.Struct("@ll")
# Never equal to a generation file's bytes: marks polling mode.
_POLLING = b"polling"
# Stands in for the mapping when there is none; with an expected byte of
# -1 every check takes the slow path, which limits itself.
_NO_FILE = bytes(64)


class _Busy(Exception):
    """Another thread holds the connection; try again on a later call."""


_live_registries: weakref.WeakSet[RemoteRegistry] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for registry in list(_live_registries):
        registry._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return _TIMEVAL.pack(whole, int((seconds - whole) * 1_000_000))


class _Channel:
    """One authenticated connection to the daemon's service object.

    It speaks the stdlib manager protocol by hand instead of through a
    ``BaseProxy``: a proxy opens a connection per thread, counts
    references with extra connections and reconnects from inside
    ``fork()``; this needs one connection with timeouts.
    """

    def __init__(self, path: str, authkey: bytes, *, timeout: float) -> None:
        self.pid = os.getpid()
        self._timeout = timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
            # The stdlib reads with os.read(): it needs a blocking file
            # descriptor, bounded by SO_RCVTIMEO instead.
            sock.setblocking(True)
            for option in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
                sock.setsockopt(socket.SOL_SOCKET, option, _timeval(timeout))
            self._conn = connection.Connection(os.dup(sock.fileno()))
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        try:
            connection.answer_challenge(self._conn, authkey)
            connection.deliver_challenge(self._conn, authkey)
            self._request(None, "accept_connection", ("dynaconn-client",))
        except BaseException:
            self.close()
            raise

    def call(self, method: str, args: tuple[Any, ...], timeout: float) -> Any:
        """Call ``method`` of the service; re-raise what it raised."""
        if timeout != self._timeout:
            self._sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(timeout)
            )
            self._timeout = timeout
        return self._request(SERVICE_IDENT, method, args)

    def _request(
        self, ident: str | None, method: str, args: tuple[Any, ...]
    ) -> Any:
        try:
            self._conn.send((ident, method, args, {}))
            data = self._conn.recv_bytes(MAX_MESSAGE_BYTES)
        except BlockingIOError:
            # SO_RCVTIMEO or SO_SNDTIMEO ran out.
            raise TimeoutError(
                f"no answer to {method}() within {self._timeout:g}s"
            ) from None
        try:
            kind, result = ForkingPickler.loads(data)
        except Exception as error:
            raise DynaconnError(
                f"cannot read the daemon's reply to {method}():"
                f" {error.__class__.__name__}: {error}"
            ) from None
        if kind == "#RETURN":
            return result
        if kind == "#ERROR" and isinstance(result, BaseException):
            # What the service raised, such as UnknownDatabaseError.
            raise result
        # A traceback the server caught outside the service.
        raise managers.RemoteError(result)

    def is_stale(self) -> bool:
        """Return whether the daemon closed this idle connection."""
        # Nothing arrives unasked, so anything readable is EOF.  A
        # non-blocking peek is one syscall; Connection.poll(0) builds a
        # selector each time, which cost ~20 us on every call.
        try:
            self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            return True
        return True

    def close(self) -> None:
        """Close this process's descriptors (the daemon sees EOF)."""
        self._conn.close()
        self._sock.close()


@dataclasses.dataclass(frozen=True)
class _Database:
    """One database as this client last built it."""

    wire: dict[str, Any]
    spec: DatabaseSpec | None
    engine: sa.Engine | None
    error: Exception | None
    schema_generation: int

    @property
    def model_key(self) -> tuple[Any, ...]:
        # Classes depend on the schema and on which database it is, not
        # on credentials: a rotated password keeps the classes.  The
        # schema generation comes first; _factory compares the rest.
        url = self.wire.get("url", {})
        return (
            self.schema_generation,
            url.get("drivername"),
            url.get("host"),
            url.get("port"),
            url.get("database"),
        )


def _build(wire: dict[str, Any], schema_generation: int) -> _Database:
    try:
        spec = spec_from_wire(wire)
        engine = build_engine(spec)
    except Exception as error:
        # One database this app cannot build (a driver missing from its
        # virtual environment) must not cost it the others.
        return _Database(wire, None, None, error, schema_generation)
    return _Database(wire, spec, engine, None, schema_generation)


def _watch(
    ref: weakref.ReferenceType[RemoteRegistry], stop: threading.Event
) -> None:
    """Check the generation file in full, for the hot path's sake.

    The hot path compares one byte and never looks at the clock; this
    thread notices what that misses (a restarted daemon's new file, a
    multiple of 256 writes) and sends the next call down the slow path.
    It holds the registry weakly, so a forgotten registry still goes.
    """
    while not stop.wait(WATCH_INTERVAL):
        registry = ref()
        if registry is None:
            return
        registry._reader.recheck()
        if registry._read_raw() != registry._raw:
            registry._byte = -1
        del registry


def _reconnect(
    socket_path: str,
    authkey_file: str,
    connect_timeout: float,
    call_timeout: float,
) -> RemoteRegistry:
    return RemoteRegistry(
        socket_path,
        authkey_file,
        connect_timeout=connect_timeout,
        call_timeout=call_timeout,
    )


class RemoteRegistry(SessionScopeMixin):
    """The databases a running ``dynaconnd`` serves, built in this process.

    ``socket`` and ``authkey_file`` default to ``$DYNACONN_SOCKET`` and
    ``$DYNACONN_AUTHKEY_FILE``, then to the daemon's runtime folder.
    Connecting agrees on the protocol and fetches every spec; it raises
    ``RegistryUnavailableError`` or ``ProtocolMismatchError``.

    Thread-safe and fork-safe: a forked child opens its own connection
    and pools.  Pickling sends the paths, never the key; the copy
    connects again where it is unpickled.
    """

    def __init__(
        self,
        socket: str | None = None,
        authkey_file: str | None = None,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        call_timeout: float = CALL_TIMEOUT,
    ) -> None:
        self.socket_path = os.path.abspath(socket or default_socket_path())
        self.authkey_file = authkey_file or default_authkey_path()
        self.connect_timeout = connect_timeout
        self.call_timeout = call_timeout
        self._reader = GenerationReader(generation_path(self.socket_path))
        # Lock order: _sync_lock, then _call_lock.
        self._sync_lock = threading.RLock()
        self._call_lock = threading.RLock()
        self._channel: _Channel | None = None
        self._databases: dict[str, _Database] = {}
        self._engines: dict[str, sa.Engine] = {}
        self._factories: dict[str, tuple[tuple[Any, ...], ModelFactory]] = {}
        self._described: dict[str, dict[str, dict[str, Any]]] = {}
        # The generation-file bytes the databases above were built for,
        # and the hot path's view of them: byte 8 of the mapping (the
        # sequence's low byte) against its expected value.  The watcher
        # thread sets _byte to -1 when the full bytes differ, so that
        # 256 writes or a remapped file are noticed too.
        self._raw: bytes | None = None
        self._map: mmap.mmap | bytes = _NO_FILE
        self._byte = -1
        self._generation = 0
        self._watcher: threading.Thread | None = None
        self._watcher_lock = threading.Lock()
        self._stop_watching = threading.Event()
        # After an attempt that changed nothing, the same bytes are not
        # tried again before _next_attempt; new bytes are tried at once.
        self._gate_raw: bytes | None = None
        self._next_attempt = 0.0
        self._retry_interval = RETRY_INTERVAL
        self._closed = False
        self._unavailable_since: float | None = None
        self._last_unavailable_event = -EVENT_INTERVAL
        self._last_reconnected_event = -EVENT_INTERVAL
        self._suppressed = 0
        _live_registries.add(self)
        self._sync_now()
        self._ensure_watcher()

    def __repr__(self) -> str:
        return (
            f"<RemoteRegistry socket={self.socket_path!r}"
            f" generation={self._generation}"
            f" databases={list(self._databases)!r}>"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _reconnect,
            (
                self.socket_path,
                self.authkey_file,
                self.connect_timeout,
                self.call_timeout,
            ),
        )

    def __enter__(self) -> RemoteRegistry:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the data plane: served from what this process built ----------

    def new_session(self, name: str) -> Session:
        """Return a new ORM session on the database called ``name``."""
        # The hot path: one byte of shared memory, one dict lookup.
        if self._map[8] != self._byte:
            self._sync()
        try:
            engine = self._engines[name]
        except KeyError:
            engine = self._engine(name)
        return Session(engine)

    def get_db_instance(self, name: str, table: str) -> type[Any]:
        """Return the ORM class of ``table`` in the database ``name``."""
        return self._factory(name).get(table)

    def list_names(self) -> list[str]:
        """Return the database names, in the daemon's order."""
        self._refresh()
        return list(self._databases)

    @property
    def generation(self) -> int:
        """Return the registry generation this client last saw."""
        self._refresh()
        return self._generation

    # -- the control plane: calls that need the daemon ----------------

    def describe(self, name: str) -> dict[str, Any]:
        """Return a description of ``name`` with its password masked."""
        return cast("dict[str, Any]", self._call("describe", name))

    def tables(self, name: str) -> list[str]:
        """Return the tables and views the daemon reflected for ``name``."""
        return cast(
            "list[str]",
            self._call("tables", name, timeout=DATABASE_CALL_TIMEOUT),
        )

    def ping(self, name: str) -> dict[str, Any]:
        """Have the daemon check ``name`` now and report how that went."""
        return cast(
            "dict[str, Any]",
            self._call("ping", name, timeout=DATABASE_CALL_TIMEOUT),
        )

    def health(self) -> dict[str, Any]:
        """Return every database's health record."""
        return cast("dict[str, Any]", self._call("health"))

    def last_outcome(self) -> dict[str, Any]:
        """Return what the daemon's most recent reload did."""
        return cast("dict[str, Any]", self._call("last_outcome"))

    def check(self, text: str) -> dict[str, Any]:
        """Return what a reload of ``text`` as source.ini would do."""
        return cast("dict[str, Any]", self._call("check", text))

    def reload(self) -> dict[str, Any]:
        """Have the daemon read source.ini now; return the outcome."""
        return self._changing("reload")

    def add_instance(
        self,
        name: str,
        data: Mapping[str, str | int | None],
        *,
        overwrite: bool = False,
    ) -> dict[str, Any]:
        """Add a section to the daemon's source.ini and apply it."""
        return self._changing("add_instance", name, dict(data), overwrite)

    def update_instance(
        self, name: str, data: Mapping[str, str | int | None]
    ) -> dict[str, Any]:
        """Change keys of a section in the daemon's source.ini."""
        return self._changing("update_instance", name, dict(data))

    def remove_instance(self, name: str) -> dict[str, Any]:
        """Remove a section from the daemon's source.ini."""
        return self._changing("remove_instance", name)

    def close(self) -> None:
        """Disconnect, stop watching and dispose every engine built here."""
        with self._sync_lock, self._call_lock:
            if self._closed:
                return
            self._closed = True
            _live_registries.discard(self)
            self._drop_channel()
            databases, self._databases = self._databases, {}
            self._engines = {}
            self._factories = {}
            self._described = {}
            self._raw = _POLLING
            self._map = _NO_FILE
            self._byte = -1
            self._stop_watching.set()
            watcher, self._watcher = self._watcher, None
        if watcher is not None and watcher is not threading.current_thread():
            watcher.join()
        self._reader.close()
        for database in databases.values():
            if database.engine is not None:
                database.engine.dispose()

    # -- keeping current ----------------------------------------------

    def _refresh(self) -> None:
        if self._map[8] != self._byte:
            self._sync()

    def _sync(self) -> None:
        """Fetch the specs, best effort: the generation file moved.

        A busy lock or an absent daemon leaves the cached databases in
        service; the same file bytes are not retried before the back-off
        ends, so a client never hammers a daemon that is away.
        """
        if self._closed:
            raise RegistryUnavailableError(f"{self!r} was closed")
        self._ensure_watcher()
        peeked = self._reader.peek()
        if peeked == self._gate_raw and time.monotonic() < self._next_attempt:
            return
        if not self._sync_lock.acquire(blocking=False):
            return
        try:
            self._sync_locked(strict=False)
        except _Busy:
            pass
        finally:
            self._sync_lock.release()

    def _sync_now(self) -> None:
        """Fetch the specs now; raise ``RegistryUnavailableError``."""
        with self._sync_lock:
            self._sync_locked(strict=True)

    def _sync_locked(self, *, strict: bool) -> None:
        if self._closed:
            raise RegistryUnavailableError(f"{self!r} was closed")
        raw = self._read_raw()
        if not strict and raw is not None and raw == self._raw:
            self._settle(raw)
            return
        now = time.monotonic()
        try:
            data = self._call("specs", wait=strict)
        except RegistryUnavailableError:
            self._gate_raw = self._reader.peek()
            self._next_attempt = now + self._retry_interval
            self._retry_interval = min(
                self._retry_interval * 2, MAX_RETRY_INTERVAL
            )
            if strict:
                raise
            return
        self._apply(data)
        self._retry_interval = RETRY_INTERVAL
        self._gate_raw = None
        # Without a generation file, poll at most every POLL_INTERVAL.
        self._next_attempt = now + POLL_INTERVAL if raw is None else 0.0
        self._settle(raw)

    def _settle(self, raw: bytes | None) -> None:
        """Make the hot path compare against ``raw`` from now on."""
        mapping = self._reader.mapping
        if raw is None or mapping is None:
            self._raw = _POLLING if raw is None else raw
            self._map, self._byte = _NO_FILE, -1
        else:
            self._raw = raw
            self._map, self._byte = mapping, raw[0]

    def _ensure_watcher(self) -> None:
        if self._watcher is not None:
            return
        with self._watcher_lock:
            if self._watcher is not None or self._closed:
                return
            self._watcher = threading.Thread(
                target=_watch,
                args=(weakref.ref(self), self._stop_watching),
                name="dynaconn-genwatch",
                daemon=True,
            )
            self._watcher.start()

    def _read_raw(self) -> bytes | None:
        """Return checked generation-file bytes; ``None`` without one."""
        checked = self._reader.read_checked()
        return None if checked is None else checked[0]

    def _apply(self, data: dict[str, Any]) -> None:
        specs: dict[str, dict[str, Any]] = data["specs"]
        schema_generations: dict[str, int] = data.get("schema_generations", {})
        old = self._databases
        new: dict[str, _Database] = {}
        retired: list[sa.Engine] = []
        for name, wire in specs.items():
            schema_generation = schema_generations.get(name, 0)
            previous = old.get(name)
            if previous is not None and previous.wire == wire:
                new[name] = dataclasses.replace(
                    previous, schema_generation=schema_generation
                )
                continue
            new[name] = _build(wire, schema_generation)
            if previous is not None and previous.engine is not None:
                retired.append(previous.engine)
        retired.extend(
            database.engine
            for name, database in old.items()
            if name not in new and database.engine is not None
        )

        # Readers take self._engines once; swap whole dicts, never edit.
        self._databases = new
        self._engines = {
            name: database.engine
            for name, database in new.items()
            if database.engine is not None
        }
        self._generation = int(data.get("generation", self._generation))

        # Idle connections of a replaced engine close now; those still
        # checked out by open sessions close when they are returned.
        for engine in retired:
            engine.dispose()
        changed = sorted(
            name
            for name in set(old) | set(new)
            if old.get(name) is None
            or new.get(name) is None
            or old[name].wire != new[name].wire
        )
        if changed:
            log.debug(
                "client.synced", generation=self._generation, changed=changed
            )

    def _database(self, name: str) -> _Database:
        """Return ``name``'s database; ask the daemon if it is unknown."""
        database = self._databases.get(name)
        if database is None:
            # Ask the daemon rather than trust the cache: it may have
            # just added the name, or died without closing its file.
            self._sync_now()
            database = self._databases.get(name)
        if database is None:
            if self._closed:
                raise RegistryUnavailableError(f"{self!r} was closed")
            raise unknown_database(name, self._databases)
        if database.error is not None:
            # The same object each time: without its last traceback.
            raise database.error.with_traceback(None)
        return database

    def _engine(self, name: str) -> sa.Engine:
        engine = self._database(name).engine
        assert engine is not None
        return engine

    def _factory(self, name: str) -> ModelFactory:
        self._refresh()
        database = self._database(name)
        key = database.model_key
        cached = self._factories.get(name)
        if cached is not None and cached[0] == key:
            return cached[1]
        with self._sync_lock:
            cached = self._factories.get(name)
            if cached is not None and cached[0] == key:
                return cached[1]
            if cached is not None and cached[0][1:] == key[1:]:
                # The same database, a new schema generation: only the
                # classes of tables that changed are built again.
                factory = cached[1]
                self._forget_changed(name, factory)
            else:
                factory = self._new_factory(name)
            self._factories = {**self._factories, name: (key, factory)}
            return factory

    def _new_factory(self, name: str) -> ModelFactory:
        # The descriptions each class was built from, to compare with
        # the daemon's after a schema change.
        seen: dict[str, dict[str, Any]] = {}
        self._described = {**self._described, name: seen}

        def describe(table: str) -> dict[str, Any]:
            description = cast(
                "dict[str, Any]",
                self._call(
                    "table_description",
                    name,
                    table,
                    timeout=DATABASE_CALL_TIMEOUT,
                ),
            )
            seen[table] = description
            return description

        def list_tables() -> list[str]:
            return cast(
                "list[str]",
                self._call("tables", name, timeout=DATABASE_CALL_TIMEOUT),
            )

        return ModelFactory(name, describe, list_tables)

    def _forget_changed(self, name: str, factory: ModelFactory) -> None:
        """Forget the classes whose table description changed."""
        seen = self._described.get(name, {})
        stale: list[str] = []
        for table, old in list(seen.items()):
            try:
                new = self._call(
                    "table_description",
                    name,
                    table,
                    timeout=DATABASE_CALL_TIMEOUT,
                )
            except KeyError:
                # UnknownTableError: the table is gone.
                new = None
            if new != old:
                stale.append(table)
                seen.pop(table, None)
        factory.invalidate(stale)

    def _changing(self, method: str, *args: Any) -> dict[str, Any]:
        outcome = self._call(method, *args, timeout=RELOAD_TIMEOUT)
        # Read your own writes: the next session sees the new specs.
        self._sync_now()
        return cast("dict[str, Any]", outcome)

    # -- the connection -------------------------------------------------

    def _call(
        self,
        method: str,
        *args: Any,
        timeout: float | None = None,
        wait: bool = True,
    ) -> Any:
        """Call the daemon; raise ``RegistryUnavailableError`` if it is away.

        Without ``wait``, raise ``_Busy`` rather than queue behind
        another thread's call (a reload may take a minute).
        """
        if self._closed:
            raise RegistryUnavailableError(f"{self!r} was closed")
        if not self._call_lock.acquire(blocking=wait):
            raise _Busy
        try:
            channel = self._connected()
            try:
                return channel.call(method, args, timeout or self.call_timeout)
            except DynaconnError:
                # Raised by the service (WritesDisabledError is also a
                # PermissionError): the connection itself is fine.
                raise
            except (OSError, EOFError) as error:
                # A reply cut short leaves the stream out of step.
                self._drop_channel()
                raise self._unavailable(error) from None
        finally:
            self._call_lock.release()

    def _connected(self) -> _Channel:
        channel = self._channel
        if channel is not None:
            if channel.pid == os.getpid() and not channel.is_stale():
                return channel
            self._drop_channel()
        try:
            authkey = read_authkey(self.authkey_file)
            channel = _Channel(
                self.socket_path, authkey, timeout=self.connect_timeout
            )
        except InsecureFileError:
            raise
        except (OSError, EOFError, AuthenticationError) as error:
            raise self._unavailable(error) from None
        try:
            hello = channel.call(
                "hello", (PROTOCOL_VERSION,), self.connect_timeout
            )
            check_protocol(hello.get("protocol"), socket_path=self.socket_path)
        except (OSError, EOFError) as error:
            channel.close()
            raise self._unavailable(error) from None
        except BaseException:
            channel.close()
            raise
        self._channel = channel
        self._note_reconnected(hello)
        return channel

    def _drop_channel(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()

    def _unavailable(self, error: BaseException) -> RegistryUnavailableError:
        reason = f"{error.__class__.__name__}: {error}".rstrip(": ")
        now = time.monotonic()
        if self._unavailable_since is None:
            self._unavailable_since = now
        if now - self._last_unavailable_event >= EVENT_INTERVAL:
            self._last_unavailable_event = now
            log.warning(
                "client.daemon_unavailable",
                socket=self.socket_path,
                error=reason,
                serving_cached=len(self._databases),
                suppressed=self._suppressed,
            )
            self._suppressed = 0
        else:
            self._suppressed += 1
        cached = "; cached databases keep working" if self._databases else ""
        return RegistryUnavailableError(
            f"dynaconnd at {self.socket_path} is not available"
            f" ({reason}){cached}"
        )

    def _note_reconnected(self, hello: dict[str, Any]) -> None:
        since, self._unavailable_since = self._unavailable_since, None
        if since is None:
            return
        now = time.monotonic()
        if now - self._last_reconnected_event >= EVENT_INTERVAL:
            self._last_reconnected_event = now
            log.info(
                "client.reconnected",
                socket=self.socket_path,
                generation=hello.get("generation"),
                daemon_version=hello.get("version"),
                down_s=round(now - since, 1),
            )

    def _after_fork(self) -> None:
        # A lock held by another thread at fork() stays held forever, and
        # the watcher thread did not come along: the next call starts one.
        self._sync_lock = threading.RLock()
        self._call_lock = threading.RLock()
        self._watcher_lock = threading.Lock()
        self._watcher = None
        self._stop_watching = threading.Event()
        self._byte = -1
        # Never speak on the parent's socket: close this copy of it.
        channel, self._channel = self._channel, None
        if channel is not None:
            with contextlib.suppress(OSError):
                channel.close()
        # Forget the parent's pooled connections without closing them,
        # which would end them for the parent too; new ones open lazily.
        for database in self._databases.values():
            if database.engine is not None:
                database.engine.dispose(close=False)
