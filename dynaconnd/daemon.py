"""The daemon's main loop: signals, reloads, liveness and shutdown.

Signal handlers, the watcher and socket calls only enqueue; this loop,
on the main thread, is the one place that acts, so reloads never run
concurrently and shutdown has one owner.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
import queue
import resource
import signal
import stat
import time
from typing import TYPE_CHECKING, Any

from dynaconnd._version import __version__
from dynaconnd.atomic import atomic_write
from dynaconnd.config import load_config
from dynaconnd.errors import ConfigError
from dynaconnd.genfile import GenerationWriter
from dynaconnd.health import HealthMonitor
from dynaconnd.logs import get_logger
from dynaconnd.notify import Notifier
from dynaconnd.protocol import SERVICE_METHODS
from dynaconnd.registry import Registry
from dynaconnd.scheduling import make_scheduler
from dynaconnd.schema_monitor import SchemaMonitor
from dynaconnd.server import SocketServer, load_or_create_authkey
from dynaconnd.service import RegistryService
from dynaconnd.watcher import ConfigWatcher

if TYPE_CHECKING:
    from types import FrameType

    from dynaconnd.registry import ReloadOutcome

__all__ = ["Daemon", "DaemonOptions"]

log = get_logger("daemon")

#: How often the loop wakes with nothing queued, to check its threads.
TICK = 0.5

#: The open-file limit the daemon raises its soft limit to, if allowed.
OPEN_FILE_TARGET = 65536

#: Mode of the daemon's small state files (no secrets inside).
STATE_FILE_MODE = 0o640

#: The longest a client's reload() waits for the main loop.
RELOAD_REQUEST_TIMEOUT = 60.0


@dataclasses.dataclass(frozen=True)
class DaemonOptions:
    """Everything the daemon is started with (flags and environment)."""

    config: str
    socket: str
    authkey_file: str
    state_dir: str | None = None
    allowed_gid: int | None = None
    allow_writes: bool = False
    debounce: float = 0.15
    drain_timeout: float = 30.0
    force_polling: bool = False
    scheduler_workers: int = 16


@dataclasses.dataclass(frozen=True)
class _Event:
    kind: str
    payload: Any = None


def _content_hash(paths: list[str]) -> str:
    """Hash the bytes of ``paths`` together; a missing file hashes too."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.encode() + b"\0")
        try:
            # O_NONBLOCK: a FIFO put in place of the file must not block
            # the main loop in open() until some writer comes along.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            with open(fd, "rb") as handle:
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    digest.update(handle.read())
                else:
                    digest.update(b"<not a regular file>")
        except OSError as error:
            digest.update(f"<{error.errno}>".encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _raise_open_file_limit() -> None:
    """Let the daemon use as many file descriptors as it is allowed.

    Every client connection, database connection and watch is a
    descriptor, and the usual soft limit of 1024 is below what
    ``server.MAX_CONNECTIONS`` clients alone may need.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else OPEN_FILE_TARGET
    wanted = min(wanted, OPEN_FILE_TARGET)
    if soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (OSError, ValueError) as error:
            log.warning(
                "daemon.open_file_limit",
                soft=soft,
                hard=hard,
                error_class=error.__class__.__name__,
            )


class Daemon:
    """One running dynaconnd: owns the registry, the jobs and the socket."""

    def __init__(self, options: DaemonOptions) -> None:
        self.options = options
        self.config_path = os.path.abspath(options.config)
        self._events: queue.SimpleQueue[_Event] = queue.SimpleQueue()
        self._should_exit = False
        self._exit_status = 0
        self._stop_signals = 0
        self._epoch = 0
        self._last_hash: str | None = None
        self._watched: list[str] = [self.config_path]
        self._status = ""
        self._last_watchdog = 0.0
        self.registry = Registry(
            drain_timeout=options.drain_timeout,
            initial_generation=self._saved_generation(),
        )
        self.scheduler = make_scheduler(max_workers=options.scheduler_workers)
        self.health = HealthMonitor(self.scheduler)
        self.schemas = SchemaMonitor(
            self.scheduler,
            state_dir=options.state_dir,
            on_change=self._schema_changed,
        )
        self.notifier = Notifier()
        self.watcher: ConfigWatcher | None = None
        self.server: SocketServer | None = None
        self.genfile: GenerationWriter | None = None

    # -- entry point -------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT; return the exit status."""
        log.info(
            "daemon.starting",
            version=__version__,
            pid=os.getpid(),
            config=self.config_path,
            socket=self.options.socket,
        )
        self._install_signal_handlers()
        _raise_open_file_limit()
        authkey = load_or_create_authkey(
            self.options.authkey_file,
            group_readable=self.options.allowed_gid is not None,
            gid=self.options.allowed_gid,
        )

        # The first configuration is live before anyone is told we are up.
        self.scheduler.start()
        self._reload(force=True, notify=False)
        self._start_server(authkey)
        self._start_watcher()
        self.notifier.ready(self._health_status())
        log.info(
            "daemon.ready",
            generation=self.registry.generation,
            databases=len(self.registry.snapshot.instances),
            watch_mode=self.watcher.mode if self.watcher else None,
        )

        while not self._should_exit:
            self._step()
        return self._shutdown()

    # -- the loop ----------------------------------------------------------

    def _step(self) -> None:
        try:
            event = self._events.get(timeout=TICK)
        except queue.Empty:
            event = None
        if event is not None:
            self._dispatch(event)
        self._check_threads()
        self._feed_watchdog()
        self._update_status()

    def _dispatch(self, event: _Event) -> None:
        if event.kind == "signal":
            self._handle_signal(event.payload)
        elif event.kind == "watch":
            self._reload(force=False)
        elif event.kind == "reload":
            future: concurrent.futures.Future[dict[str, Any]] = event.payload
            if future.set_running_or_notify_cancel():
                future.set_result(self._reload(force=True).as_dict())
        elif event.kind == "schema":
            self._bump_epoch()

    def _handle_signal(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            log.info("signal.received", signal="SIGHUP")
            self._reload(force=True)
        else:
            log.info("signal.received", signal=signal.Signals(signum).name)
            self._should_exit = True

    def _reload(self, *, force: bool, notify: bool = True) -> ReloadOutcome:
        digest = _content_hash(self._watched)
        outcome = self.registry.last_outcome
        if not force and digest == self._last_hash and outcome is not None:
            log.debug("reload.skipped", reason="content unchanged")
            return outcome
        self._last_hash = digest

        if not os.path.lexists(self.config_path) and outcome is not None:
            # Mid-save (vim moves the old file away before writing the
            # new one): the watcher fires again when the file is back.
            log.warning("config.missing", file=self.config_path)
            self._last_hash = None
            return outcome

        if notify:
            self.notifier.reloading()
        try:
            config = load_config(self.config_path)
        except ConfigError as error:
            outcome = self.registry.reject(error, path=self.config_path)
        else:
            outcome = self.registry.apply(config)
            self._watch_files([self.config_path, *config.watched_files])
            specs = {
                name: instance.spec
                for name, instance in self.registry.snapshot.instances.items()
            }
            self.health.sync(specs)
            self.schemas.sync(specs)
            if outcome.has_changes:
                self._save_generation()
                self._bump_epoch()
        if notify:
            self.notifier.ready(self._health_status())
        return outcome

    def _generation_file(self) -> str | None:
        state_dir = self.options.state_dir
        return os.path.join(state_dir, "generation") if state_dir else None

    def _saved_generation(self) -> int:
        # Generations keep rising across restarts, so a client that waits
        # for "a generation above N" is never fooled by a restart.
        path = self._generation_file()
        if path is None:
            return 0
        try:
            with open(path, encoding="ascii") as handle:
                return max(0, int(handle.read().strip()))
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as error:
            log.warning(
                "state.generation_unreadable",
                path=path,
                error_class=error.__class__.__name__,
            )
            return 0

    def _save_generation(self) -> None:
        path = self._generation_file()
        if path is None:
            return
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_write(
                path,
                f"{self.registry.generation}\n".encode(),
                mode=STATE_FILE_MODE,
            )
        except OSError as error:
            log.warning(
                "state.generation_unwritable",
                path=path,
                error_class=error.__class__.__name__,
            )

    def _watch_files(self, paths: list[str]) -> None:
        if paths == self._watched:
            return
        self._watched = paths
        # Fold the new files' content in, so the next save compares fairly.
        self._last_hash = _content_hash(paths)
        if self.watcher is not None:
            self.watcher.set_paths(paths)

    def _bump_epoch(self) -> None:
        self._epoch += 1
        if self.genfile is not None:
            self.genfile.publish(self._epoch)

    def _schema_changed(self, name: str) -> None:
        # Called from a scheduler thread: hand the change to the loop.
        self._events.put(_Event("schema", name))

    def _request_reload(self) -> dict[str, Any]:
        # Called from a socket thread: the loop does the work.
        future: concurrent.futures.Future[dict[str, Any]] = (
            concurrent.futures.Future()
        )
        self._events.put(_Event("reload", future))
        return future.result(timeout=RELOAD_REQUEST_TIMEOUT)

    # -- threads and liveness ----------------------------------------------

    def _start_server(self, authkey: bytes) -> None:
        service = RegistryService(
            registry=self.registry,
            health=self.health,
            schemas=self.schemas,
            config_path=self.config_path,
            request_reload=self._request_reload,
            epoch=lambda: self._epoch,
            allow_writes=self.options.allow_writes,
        )
        self.server = SocketServer(
            service,
            socket_path=self.options.socket,
            authkey=authkey,
            allowed_gid=self.options.allowed_gid,
            exposed=SERVICE_METHODS,
        )
        self.server.start()
        self.genfile = GenerationWriter(self.options.socket + ".gen")
        self.genfile.publish(self._epoch)

    def _start_watcher(self) -> None:
        self.watcher = ConfigWatcher(
            self._watched,
            self._on_watch,
            debounce=self.options.debounce,
            force_polling=self.options.force_polling,
        )
        self.watcher.start()

    def _on_watch(self) -> None:
        self._events.put(_Event("watch"))

    def _check_threads(self) -> None:
        watcher = self.watcher
        if watcher is not None and not watcher.is_alive():
            # A deaf watcher is worse than none: restart it, and if that
            # fails, exit so systemd restarts the whole daemon.
            log.error("watcher.died", mode=watcher.mode)
            try:
                watcher.restart()
            except OSError as error:
                log.critical(
                    "watcher.restart_failed",
                    error_class=error.__class__.__name__,
                    error=str(error),
                )
            if not watcher.is_alive():
                self._should_exit = True
                self._exit_status = 1
            else:
                self._events.put(_Event("watch"))

    def _threads_alive(self) -> bool:
        watcher_ok = self.watcher is not None and self.watcher.is_alive()
        return watcher_ok and bool(self.scheduler.running)

    def _feed_watchdog(self) -> None:
        interval = self.notifier.watchdog_interval
        if interval is None:
            return
        now = time.monotonic()
        if now - self._last_watchdog >= interval and self._threads_alive():
            self.notifier.watchdog()
            self._last_watchdog = now

    def _health_status(self) -> str:
        # Called on every tick: counts only, never the full records.
        counts = self.health.state_counts()
        up = counts.get("up", 0) + counts.get("slow", 0)
        return f"{up}/{sum(counts.values())} databases up"

    def _update_status(self) -> None:
        status = self._health_status()
        if status != self._status:
            self._status = status
            self.notifier.status(status)

    # -- signals and shutdown ----------------------------------------------

    def _install_signal_handlers(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only record the signal; the main loop acts on it.  A second
        # stop signal while stopping means "now": that one cannot wait.
        if signum != signal.SIGHUP:
            self._stop_signals += 1
            # Counted here, not in the loop: the loop may be the thing
            # that is stuck.
            if self._stop_signals > 1:
                os._exit(128 + signum)
        self._events.put(_Event("signal", signum))

    def _shutdown(self) -> int:
        started = time.monotonic()
        self.notifier.stopping()
        log.info("daemon.stopping")
        if self.server is not None:
            self.server.stop()
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher.join(timeout=2)
        # Jobs stuck on a dead host cannot be interrupted; their probes
        # carry their own timeouts, so do not wait for them here.
        self.scheduler.shutdown(wait=False)
        self.health.close()
        self.schemas.close()
        self.registry.close()
        if self.genfile is not None:
            self.genfile.close()
        self.notifier.close()
        log.info(
            "daemon.stopped",
            status=self._exit_status,
            shutdown_ms=round((time.monotonic() - started) * 1000, 1),
        )
        return self._exit_status
