"""Tell the daemon that its config files may have changed.

A ``ConfigWatcher`` watches the *folder* of each file, not the file, and
filters events by name: an editor or an agent that saves by writing a
temp file and renaming it over the old one gives the file a new inode,
and a watch on the old inode would go deaf.  What each save looks like
at the event level, in the folder of ``source.ini``:

- temp file + rename (``sed -i``, IDEs, consul-template): ``moved``
  from the temp name to ``source.ini``;
- vim (``mv source.ini source.ini~``, write, remove the backup):
  ``moved`` away from ``source.ini``, then ``created`` / ``modified`` /
  ``closed`` on the new ``source.ini``;
- in-place write: ``modified`` (once per write) and ``closed``;
- delete and recreate: ``deleted``, then ``created`` / ``modified``;
- symlink swap of the file (``ln -s v2.ini tmp; mv tmp source.ini``):
  ``moved`` onto ``source.ini``;
- Kubernetes ConfigMap (``source.ini -> ..data/source.ini`` and
  ``..data -> ..2024_01_01_x``, swapped by renaming a new ``..data``
  link over the old): ``moved`` onto ``..data``.

Every symlink met while resolving a watched path is part of that path:
an event on any of them, or on the file it finally points to, counts,
and the folders holding them are watched too.  Any event that counts
restarts a quiet window; when the window passes without one,
``on_change()`` is called once, from the watcher's own thread.

The watcher does not read files.  Deciding whether the content really
changed (hashing) and refusing a missing or empty file are the caller's
job: a callback only means "look again", and the file may be absent at
that moment.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from typing import TYPE_CHECKING, Literal

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from dynaconnd.logs import get_logger

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from pathlib import Path

    from watchdog.events import FileSystemEvent
    from watchdog.observers.api import BaseObserver, ObservedWatch

__all__ = ["ConfigWatcher", "WatchMode"]

WatchMode = Literal["inotify", "polling"]

# Event kinds that can mean new content.  Opening and closing without a
# write are left out on purpose: the daemon reads the file on every
# callback, and counting its own reads would loop forever.  The folder's
# own "modified" event is left out as noise: every change in it sends
# one, whatever the file.
_EVENT_FILTER: list[type[FileSystemEvent]] = [
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
]

# The errors inotify gives when a per-user limit is reached, with the
# sysctl that raises it.  watchdog turns both errnos into these OSErrors.
_LIMITS = {
    errno.EMFILE: ("max_user_instances", "fs.inotify.max_user_instances"),
    errno.ENOSPC: ("max_user_watches", "fs.inotify.max_user_watches"),
}

# The kernel gives up after this many symlinks in one lookup (ELOOP).
_MAX_SYMLINKS = 40

_THREAD_PREFIX = "dynaconn-watcher"


def _lookups(path: str) -> tuple[frozenset[tuple[str, str]], list[str]]:
    """Return the (folder, name) pairs met resolving ``path``, and folders.

    The pairs are the file itself and every symlink followed on the way
    to what it points to, that target included.  The folders are those
    to watch: the folder of ``path``, every folder holding one of those
    symlinks, and the folder of the final target.  The folder of
    ``path`` is taken as it is: symlinks above it are not followed.
    """
    folder, name = os.path.split(path)
    parts = [name]
    pairs: set[tuple[str, str]] = set()
    folders = [folder]
    hops = 0
    while parts:
        part = parts.pop(0)
        if part in {"", "."}:
            continue
        if part == "..":
            folder = os.path.dirname(folder)
            continue
        pairs.add((folder, part))
        candidate = os.path.join(folder, part)
        try:
            target = os.readlink(candidate)
        except OSError:
            # Not a symlink, or not there (yet): either way a lookup
            # would descend into it as it stands.
            if not parts and folder not in folders:
                folders.append(folder)
            folder = candidate
            continue
        if folder not in folders:
            folders.append(folder)
        hops += 1
        if hops > _MAX_SYMLINKS:
            break
        if os.path.isabs(target):
            folder = os.sep
        parts = target.split(os.sep) + parts
    return frozenset(pairs), folders


class _Debouncer(threading.Thread):
    """Run ``action`` once a quiet window has passed since the last poke."""

    def __init__(self, window: float, action: Callable[[], None]) -> None:
        # A daemon thread, so that a watcher someone forgot to stop never
        # holds the interpreter open; stop() still joins it.
        super().__init__(name=f"{_THREAD_PREFIX}-debounce", daemon=True)
        self._window = window
        self._action = action
        self._condition = threading.Condition()
        self._deadline: float | None = None
        self._should_exit = False

    def poke(self) -> None:
        """Start the quiet window again from now."""
        with self._condition:
            self._deadline = time.monotonic() + self._window
            self._condition.notify()

    def stop(self) -> None:
        """Ask the thread to end; a pending action is dropped."""
        with self._condition:
            self._should_exit = True
            self._condition.notify()

    def run(self) -> None:
        while True:
            with self._condition:
                while not self._should_exit:
                    if self._deadline is None:
                        self._condition.wait()
                        continue
                    remaining = self._deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._condition.wait(remaining)
                if self._should_exit:
                    return
                self._deadline = None

            # Outside the lock, so events during the action start a new
            # window instead of waiting for it.
            self._action()


class _Handler(FileSystemEventHandler):
    """Hand every event watchdog dispatches to one function."""

    def __init__(self, receive: Callable[[FileSystemEvent], None]) -> None:
        self._receive = receive

    def dispatch(self, event: FileSystemEvent) -> None:
        self._receive(event)


def _native_observer() -> BaseObserver:
    return Observer()


def _halt(observer: BaseObserver) -> None:
    """Stop ``observer`` and its emitters, started or not, and join them."""
    # stop() works on an observer that never started: it unschedules
    # every watch, which stops and joins the emitters, and releases the
    # inotify instance the observer opened in its constructor.
    observer.stop()
    if observer.ident is not None:
        observer.join()


class ConfigWatcher:
    """Call ``on_change()`` once each burst of changes to ``paths`` ends.

    ``debounce`` is the quiet window in seconds.  inotify is used unless
    ``force_polling`` is set or inotify is out of instances or watches,
    in which case the folders are polled every ``poll_interval`` seconds.
    ``observer_factory`` builds the native observer (tests inject one
    that fails).

    ``on_change`` runs on the watcher's thread; it should only record
    that a reload is due (set a flag, put on a queue) and must not call
    ``stop()``.  An exception from it is logged and the watcher goes on.
    """

    def __init__(
        self,
        paths: Iterable[str | Path],
        on_change: Callable[[], object],
        *,
        debounce: float = 0.15,
        poll_interval: float = 1.0,
        force_polling: bool = False,
        observer_factory: Callable[[], BaseObserver] | None = None,
    ) -> None:
        self._paths = self._normalise(paths)
        self._on_change = on_change
        self._debounce = debounce
        self._poll_interval = poll_interval
        self._force_polling = force_polling
        self._observer_factory = observer_factory or _native_observer
        self._log = get_logger("watcher")
        self._handler = _Handler(self._receive)

        # Guards the observer, the watches and the mode.  The event
        # handler never takes it: watchdog calls the handler while
        # holding the observer's own lock, and schedule() takes that
        # lock under this one, so taking both from the handler could
        # deadlock.  The handler reads _paths and _debouncer, which are
        # only ever replaced whole.
        self._lock = threading.RLock()
        self._observer: BaseObserver | None = None
        self._watches: dict[str, ObservedWatch] = {}
        self._debouncer: _Debouncer | None = None
        self._mode: WatchMode = "polling" if force_polling else "inotify"

    @property
    def mode(self) -> WatchMode:
        """How the folders are watched: ``inotify`` or ``polling``."""
        return self._mode

    @property
    def paths(self) -> tuple[str, ...]:
        """The absolute paths watched, in the order given."""
        return self._paths

    def start(self) -> None:
        """Start watching; raise if no folder of the paths exists."""
        with self._lock:
            if self._debouncer is not None:
                raise RuntimeError("the config watcher is already started")
            self._check_folders(self._paths, at_start=True)
            debouncer = _Debouncer(self._debounce, self._fire)
            debouncer.start()

            # Set before the observer starts, so that no early event
            # finds nobody to poke.
            self._debouncer = debouncer
            try:
                self._observer = self._open_observer()
            except BaseException:
                self._debouncer = None
                debouncer.stop()
                debouncer.join()
                raise
            folders = list(self._watches)
        self._log.info(
            "watcher.started",
            mode=self._mode,
            paths=list(self._paths),
            folders=folders,
        )

    def stop(self) -> None:
        """Stop watching and join every thread the watcher started."""
        with self._lock:
            observer, self._observer = self._observer, None
            debouncer, self._debouncer = self._debouncer, None
            self._watches = {}
        if observer is None and debouncer is None:
            return

        # Joined outside the lock: the debouncer may be waiting for it
        # to refresh the watches.
        if debouncer is not None:
            debouncer.stop()
            if debouncer is not threading.current_thread():
                debouncer.join()
        if observer is not None:
            _halt(observer)
        self._log.info("watcher.stopped")

    def join(self, timeout: float | None = None) -> None:
        """Wait until the watcher's threads have ended."""
        with self._lock:
            threads: list[threading.Thread] = [
                thread
                for thread in (self._observer, self._debouncer)
                if thread is not None
            ]
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in threads:
            left = None
            if deadline is not None:
                left = max(0.0, deadline - time.monotonic())
            thread.join(left)

    def restart(self) -> None:
        """Stop, then start again with a fresh observer and debouncer."""
        self.stop()
        self.start()
        self._log.info("watcher.restarted", mode=self._mode)

    def is_alive(self) -> bool:
        """Say whether every thread needed to notice a change is running.

        False once stopped, when the observer or the debouncer has died,
        or when the folder of a watched path exists but nothing watches
        it (a thread crashed, or the folder was removed and made again:
        nothing could hear it come back).  The caller should restart.
        """
        with self._lock:
            observer = self._observer
            debouncer = self._debouncer
            if observer is None or debouncer is None:
                return False
            if not (observer.is_alive() and debouncer.is_alive()):
                return False
            alive = {
                emitter.watch.path: emitter.is_alive()
                for emitter in observer.emitters
            }
            folders = {os.path.dirname(path) for path in self._paths}
            return all(
                alive.get(folder, False)
                for folder in folders
                if os.path.isdir(folder)
            )

    def set_paths(self, paths: Iterable[str | Path]) -> None:
        """Watch ``paths`` instead; a path in a missing folder is skipped."""
        normalised = self._normalise(paths)
        with self._lock:
            if self._observer is not None:
                self._check_folders(normalised, at_start=False)
            self._paths = normalised
            self._refresh()
        self._log.info("watcher.paths_set", paths=list(normalised))

    @staticmethod
    def _normalise(paths: Iterable[str | Path]) -> tuple[str, ...]:
        absolute = (os.path.abspath(os.fspath(path)) for path in paths)
        return tuple(dict.fromkeys(absolute))

    def _check_folders(
        self, paths: tuple[str, ...], *, at_start: bool
    ) -> None:
        """Warn of each missing folder; at start, raise if all are."""
        folders = list(dict.fromkeys(os.path.dirname(p) for p in paths))
        missing = [folder for folder in folders if not os.path.isdir(folder)]

        # Never run without any watch at all; a missing password file
        # folder, though, must not stop the watch on source.ini.
        if at_start and not folders:
            raise ValueError("the config watcher needs at least one path")
        if at_start and missing == folders:
            raise FileNotFoundError(
                errno.ENOENT, "cannot watch a missing folder", missing[0]
            )
        for folder in missing:
            self._log.warning("watcher.folder_missing", folder=folder)

    def _wanted_folders(self) -> list[str]:
        folders: dict[str, None] = {}
        for path in self._paths:
            folders.update(dict.fromkeys(_lookups(path)[1]))
        return list(folders)

    def _open_observer(self) -> BaseObserver:
        """Start the native observer, or the polling one if inotify is out."""
        if not self._force_polling:
            try:
                return self._begin(self._observer_factory(), "inotify")
            except OSError as error:
                if error.errno not in _LIMITS:
                    raise
                self._report_limit(error)
        return self._begin(
            PollingObserver(timeout=self._poll_interval), "polling"
        )

    def _begin(self, observer: BaseObserver, mode: WatchMode) -> BaseObserver:
        """Schedule the folders on ``observer`` and start it."""
        observer.name = f"{_THREAD_PREFIX}-observer"
        self._watches = {}
        try:
            self._sync_watches(observer)

            # inotify watches are added here, when the emitters start,
            # so this is where a full watch table shows up.
            observer.start()
        except BaseException:
            self._watches = {}
            _halt(observer)
            raise
        self._mode = mode
        return observer

    def _report_limit(self, error: OSError) -> None:
        # Only called for an errno in _LIMITS; "or 0" is for the types.
        limit, sysctl = _LIMITS[error.errno or 0]
        self._log.error(
            "watcher.inotify_unavailable",
            limit=limit,
            sysctl=sysctl,
            error=str(error),
            fallback="polling",
            poll_interval=self._poll_interval,
        )

    def _sync_watches(self, observer: BaseObserver) -> None:
        """Make ``observer`` watch exactly the folders the paths need.

        A watch whose emitter died (its folder went away) is dropped and
        added again if the folder is back.  Raise an OSError that is an
        inotify limit; log and skip any other error.
        """
        wanted = self._wanted_folders()
        alive = {
            emitter.watch: emitter.is_alive() or emitter.ident is None
            for emitter in observer.emitters
        }
        for folder, watch in list(self._watches.items()):
            if folder not in wanted or not alive.get(watch, False):
                del self._watches[folder]
                if watch in alive:
                    observer.unschedule(watch)
        for folder in wanted:
            if folder in self._watches or not os.path.isdir(folder):
                continue
            try:
                # follow_symlink: a watched folder may itself be a
                # symlink, and inotify must watch what it points to.
                self._watches[folder] = observer.schedule(
                    self._handler,
                    folder,
                    recursive=False,
                    event_filter=_EVENT_FILTER,
                    follow_symlink=True,
                )
            except OSError as error:
                if error.errno in _LIMITS:
                    raise
                self._log.warning(
                    "watcher.watch_failed",
                    folder=folder,
                    error=type(error).__name__,
                    message=str(error),
                )
        for emitter in observer.emitters:
            if not emitter.name.startswith(_THREAD_PREFIX):
                emitter.name = f"{_THREAD_PREFIX}-emitter"

    def _refresh(self) -> None:
        """Follow symlink swaps; switch to polling if inotify runs out."""
        with self._lock:
            observer = self._observer
            if observer is None:
                return
            try:
                self._sync_watches(observer)
            except OSError as error:
                if self._mode != "inotify" or error.errno not in _LIMITS:
                    raise
                self._report_limit(error)
                self._observer = None
                self._watches = {}
                _halt(observer)
                self._observer = self._begin(
                    PollingObserver(timeout=self._poll_interval), "polling"
                )

    def _receive(self, event: FileSystemEvent) -> None:
        """Restart the quiet window if ``event`` concerns a watched path."""
        # Runs on watchdog's observer thread, which an exception would
        # end for good.
        try:
            if self._concerns_paths(event):
                self._log.debug(
                    "watcher.event",
                    kind=event.event_type,
                    path=os.fsdecode(event.src_path),
                    dest=os.fsdecode(event.dest_path) or None,
                )
                debouncer = self._debouncer
                if debouncer is not None:
                    debouncer.poke()
        except Exception as error:
            self._log.error(
                "watcher.callback_failed",
                where="handler",
                error=type(error).__name__,
                message=str(error),
            )

    def _concerns_paths(self, event: FileSystemEvent) -> bool:
        touched = [
            os.fsdecode(path)
            for path in (event.src_path, event.dest_path)
            if path
        ]
        paths = self._paths

        # The folder of a path itself went away: a callback lets the
        # daemon look, and is_alive() now says the watch is gone.
        folders = {os.path.dirname(path) for path in paths}
        if any(path in folders for path in touched):
            return True

        # Resolved now, not when the watch began: after a symlink swap
        # the old target no longer counts, so removing it afterwards
        # starts no second window.
        pairs: set[tuple[str, str]] = set()
        for path in paths:
            pairs |= _lookups(path)[0]
        return any(os.path.split(path) in pairs for path in touched)

    def _fire(self) -> None:
        """Follow any symlink swap, then call ``on_change``."""
        try:
            self._refresh()
        except Exception as error:
            self._log.error(
                "watcher.refresh_failed",
                error=type(error).__name__,
                message=str(error),
            )
        try:
            self._on_change()
        except Exception as error:
            self._log.error(
                "watcher.callback_failed",
                where="on_change",
                error=type(error).__name__,
                message=str(error),
            )
