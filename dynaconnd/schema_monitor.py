"""Schema watch: one reflection job per database, a cache on disk.

Each run takes the catalog's fingerprint first and reflects in full only
when it differs from the last one.  A change that clients can see (a
table or column added, removed or altered) raises the database's schema
generation, logs one ``schema.changed`` event and calls ``on_change``.

Reflected schemas are kept under ``state_dir/schemas/``, one JSON file
per database, so a restarted daemon serves tables at once and only
re-reflects when the fingerprint moved.  A file's name hashes the
database name and its connection identity (driver, host, port, database
and user, never the password), so a section that now points elsewhere
never reuses another database's schema.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import difflib
import hashlib
import itertools
import json
import os
import threading
import time
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from apscheduler.executors.pool import ThreadPoolExecutor

from dynaconnd import schema
from dynaconnd.atomic import atomic_write
from dynaconnd.errors import UnknownDatabaseError, UnknownTableError
from dynaconnd.health import build_probe_engine, probe_connect_args
from dynaconnd.logs import MASK, get_logger, redact
from dynaconnd.scheduling import add_database_job, arm_job, remove_job

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from apscheduler.schedulers.base import BaseScheduler
    from sqlalchemy.engine import Engine

    from dynaconnd.spec import DatabaseSpec

__all__ = [
    "CACHE_DIR_MODE",
    "CACHE_FILE_MODE",
    "CACHE_FORMAT_VERSION",
    "DEFAULT_MAX_WORKERS",
    "DEFAULT_ON_DEMAND_GAP",
    "DEFAULT_ON_DEMAND_TIMEOUT",
    "REFLECT_STATEMENT_TIMEOUT",
    "SchemaMonitor",
    "build_reflection_engine",
    "cache_file_name",
]

CACHE_FORMAT_VERSION = 1
#: Cached schemas hold no secret; the daemon's group may read them.
CACHE_FILE_MODE = 0o640
CACHE_DIR_MODE = 0o750
DEFAULT_MAX_WORKERS = 4
#: The longest one catalog query of a reflection may run, in seconds.
REFLECT_STATEMENT_TIMEOUT = 60.0
#: The least time between two on-demand checks of one database.
DEFAULT_ON_DEMAND_GAP = 1.0
#: How long a read waits for an on-demand check to finish.
DEFAULT_ON_DEMAND_TIMEOUT = 5.0

_MAX_ERROR_CHARS = 500
_CLOSE_MATCHES = 5

_log = get_logger("schema")

_monitor_numbers = itertools.count(1)


def build_reflection_engine(spec: DatabaseSpec) -> Engine:
    """Return an unpooled engine for reflecting ``spec``'s database.

    Connecting is bounded by ``health_timeout``, as for a health probe
    (and SQLite is opened without creating a missing file); each
    catalog query may take up to ``REFLECT_STATEMENT_TIMEOUT``.
    """
    probe_engine = build_probe_engine(spec)
    url = probe_engine.url
    probe_engine.dispose()
    connect_args = probe_connect_args(url, timeout=REFLECT_STATEMENT_TIMEOUT)
    quick = probe_connect_args(url, timeout=spec.schedule.health_timeout)
    if "connect_timeout" in quick:
        connect_args["connect_timeout"] = quick["connect_timeout"]
    return sa.create_engine(
        url, poolclass=sa.pool.NullPool, connect_args=connect_args
    )


def cache_file_name(spec: DatabaseSpec) -> str:
    """Return the cache file's name for ``spec``: a hash of its identity."""
    url = spec.url
    identity = [
        spec.name,
        url.drivername,
        url.host,
        url.port,
        url.database,
        url.username,
    ]
    digest = hashlib.sha256(json.dumps(identity).encode()).hexdigest()
    return f"{digest[:32]}.json"


@dataclasses.dataclass(frozen=True)
class _State:
    """What is known of one database's schema; replaced, never changed."""

    tables: Mapping[str, dict[str, Any]]
    fingerprint: str | None
    generation: int
    # "none" until a reflection or a cache filled it.
    source: str = "none"

    @property
    def is_known(self) -> bool:
        return self.source != "none"


_EMPTY = _State(tables={}, fingerprint=None, generation=0)


@dataclasses.dataclass(eq=False)
class _Entry:
    """One database under watch: its spec, engine, job and schema."""

    name: str
    spec: DatabaseSpec
    engine: Engine
    job_id: str
    cache_path: str | None
    state: _State = _EMPTY
    # Serialises checks of this database: the job, refresh(), reads.
    run_lock: threading.Lock = dataclasses.field(
        default_factory=threading.Lock
    )
    # The fields below are guarded by the monitor's lock.
    checks_started: int = 0
    checks_finished: int = 0
    is_job_running: bool = False
    demand_target: int = 0
    demand_at: float = -float("inf")
    failures: int = 0


class SchemaMonitor:
    """Run one reflection job per database on ``scheduler``.

    Checks run on an executor of their own (threads ``dynaconn-schema``)
    of at most ``max_workers`` threads, so a slow reflection never
    delays a health check.  Readers get the state published by the last
    check whole, never half-built.
    """

    def __init__(
        self,
        scheduler: BaseScheduler,
        *,
        state_dir: str | None,
        on_change: Callable[[str], None] | None = None,
        max_workers: int = DEFAULT_MAX_WORKERS,
        engine_factory: Callable[
            [DatabaseSpec], Engine
        ] = build_reflection_engine,
        on_demand_gap: float = DEFAULT_ON_DEMAND_GAP,
        on_demand_timeout: float = DEFAULT_ON_DEMAND_TIMEOUT,
    ) -> None:
        if max_workers < 1:
            raise ValueError(
                f"max_workers must be at least 1, not {max_workers}"
            )
        self._scheduler = scheduler
        self._cache_dir = (
            None if state_dir is None else os.path.join(state_dir, "schemas")
        )
        self._on_change = on_change
        self._engine_factory = engine_factory
        self._on_demand_gap = on_demand_gap
        self._on_demand_timeout = on_demand_timeout
        self._lock = threading.Lock()
        self._checked = threading.Condition(self._lock)
        self._sync_lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._unwritable: set[str] = set()
        self._job_numbers = itertools.count(1)
        self._is_closed = False

        self._executor_alias = f"dynaconn-schema-{next(_monitor_numbers)}"
        self._executor = ThreadPoolExecutor(
            max_workers, pool_kwargs={"thread_name_prefix": "dynaconn-schema"}
        )
        scheduler.add_executor(self._executor, alias=self._executor_alias)
        if self._cache_dir is None:
            _log.info("schema.cache_disabled", reason="no state directory")

    # -- the set of databases ------------------------------------------

    def sync(self, specs: Mapping[str, DatabaseSpec]) -> None:
        """Watch exactly the databases in ``specs``.

        A new database is served from its cache file at once, if there
        is one, and checked in the background right away.  A changed one
        gets a new job and engine; it keeps its schema unless it now
        points at another database.  A removed one loses both.
        """
        with self._sync_lock:
            with self._lock:
                if self._is_closed:
                    raise RuntimeError("the schema monitor is closed")
                current = dict(self._entries)

            # Build what is new or changed before touching what runs.
            fresh: dict[str, _Entry] = {}
            for name, spec in specs.items():
                old = current.get(name)
                if old is not None and old.spec == spec:
                    continue
                entry = self._build_entry(name, spec, old)
                if entry is not None:
                    fresh[name] = entry
            retired = [
                entry
                for name, entry in current.items()
                if name not in specs or name in fresh
            ]

            with self._lock:
                for entry in retired:
                    del self._entries[entry.name]
                for name, entry in fresh.items():
                    old = current.get(name)
                    # Read here, under the lock, so a check of the old
                    # entry that ends meanwhile is never lost.
                    if old is not None and old.cache_path == entry.cache_path:
                        entry.state = old.state
                self._entries.update(fresh)
                self._checked.notify_all()

            for entry in retired:
                self._remove_job(entry)
                entry.engine.dispose()
            for entry in fresh.values():
                self._add_job(entry)

        added = sorted(name for name in fresh if name not in current)
        changed = sorted(name for name in fresh if name in current)
        removed = sorted(name for name in current if name not in specs)
        if added or changed or removed:
            _log.info(
                "schema.synced", added=added, changed=changed, removed=removed
            )

    def _build_entry(
        self, name: str, spec: DatabaseSpec, old: _Entry | None
    ) -> _Entry | None:
        try:
            engine = self._engine_factory(spec)
        # A missing driver or a URL SQLAlchemy cannot use: the registry
        # reports those too; the monitor says once that it cannot reflect.
        except (ImportError, sa.exc.ArgumentError) as error:
            _log.error(
                "schema.unavailable",
                database=name,
                error_class=type(error).__name__,
                error=redact(str(error)),
            )
            return None
        cache_path = None
        if self._cache_dir is not None:
            cache_path = os.path.join(self._cache_dir, cache_file_name(spec))
        entry = _Entry(
            name=name,
            spec=spec,
            engine=engine,
            job_id=f"schema:{name}:{next(self._job_numbers)}",
            cache_path=cache_path,
        )
        if old is not None and old.cache_path == cache_path:
            return entry  # sync() hands the old state over

        state = _EMPTY
        if cache_path is not None:
            state = self._load_cache(name, cache_path) or _EMPTY
        if old is not None:
            # Another database now: clients must see a new generation.
            generation = max(state.generation, old.state.generation + 1)
            state = dataclasses.replace(state, generation=generation)
        entry.state = state
        return entry

    def _add_job(self, entry: _Entry) -> None:
        add_database_job(
            self._scheduler,
            self._run,
            job_id=entry.job_id,
            name=f"schema check of {entry.name}",
            interval=entry.spec.schedule.reflect_interval,
            executor=self._executor_alias,
            args=(entry,),
        )

    def _remove_job(self, entry: _Entry) -> None:
        remove_job(self._scheduler, entry.job_id)

    def _arm(self, entry: _Entry, delay: float | None) -> None:
        """Set the job's next run ``delay`` seconds from now; None pauses."""
        arm_job(self._scheduler, entry.job_id, delay)

    def _is_current(self, entry: _Entry) -> bool:
        return not self._is_closed and self._entries.get(entry.name) is entry

    # -- checks ------------------------------------------------------------

    def _run(self, entry: _Entry) -> None:
        """Check one database as its scheduled job, then set the next run."""
        with self._lock:
            if not self._is_current(entry):
                return
            entry.is_job_running = True
        # No second run may start while this one waits on a dead host;
        # the end of this run sets the next one.
        self._arm(entry, None)
        try:
            self._check(entry)
        finally:
            with self._lock:
                entry.is_job_running = False
                wanted = entry.checks_finished < entry.demand_target
                delay = 0.0 if wanted else self._next_delay(entry)
                # Armed under the lock, so an on-demand request either
                # sees this run going or arms after this line.
                if self._is_current(entry):
                    self._arm(entry, delay)

    @staticmethod
    def _next_delay(entry: _Entry) -> float:
        schedule = entry.spec.schedule
        if entry.failures:
            # A database that was down when reflected gets another try
            # at the health interval's pace, not after a whole
            # reflect_interval, so it is current soon after it is back.
            return min(schedule.reflect_interval, schedule.health_interval)
        return schedule.reflect_interval

    def _check(self, entry: _Entry) -> dict[str, Any] | None:
        """Fingerprint, reflect if needed; return the diff if published."""
        with entry.run_lock:
            with self._lock:
                entry.checks_started += 1
            try:
                return self._reflect(entry)
            finally:
                with self._lock:
                    entry.checks_finished += 1
                    self._checked.notify_all()

    def _reflect(self, entry: _Entry) -> dict[str, Any] | None:
        previous = entry.state
        scope = entry.spec.reflection
        started = time.perf_counter()
        try:
            with entry.engine.connect() as connection:
                fingerprint = schema.fingerprint(connection, scope)
                if previous.is_known and fingerprint == previous.fingerprint:
                    tables = None
                else:
                    tables = schema.reflect_tables(connection, scope)
        # DBAPIError covers a database that is down or refuses us;
        # OSError a socket failing outside the DBAPI.
        except (sa.exc.SQLAlchemyError, OSError) as error:
            self._failed(entry, error)
            return None
        duration_ms = round((time.perf_counter() - started) * 1000.0, 3)
        with self._lock:
            entry.failures = 0

        if tables is None:
            _log.debug(
                "schema.checked",
                database=entry.name,
                fingerprint=fingerprint,
                duration_ms=duration_ms,
            )
            return None
        return self._publish(
            entry, previous, tables, fingerprint, duration_ms=duration_ms
        )

    def _publish(
        self,
        entry: _Entry,
        previous: _State,
        tables: dict[str, dict[str, Any]],
        fingerprint: str,
        *,
        duration_ms: float,
    ) -> dict[str, Any] | None:
        """Replace the state after a full reflection; log what changed."""
        diff = schema.diff_schemas(dict(previous.tables), tables)
        is_visible = not previous.is_known or any(diff.values())
        state = _State(
            tables=tables,
            fingerprint=fingerprint,
            generation=previous.generation + (1 if is_visible else 0),
            source="reflection",
        )
        with self._lock:
            if not self._is_current(entry):
                return None
        # On disk first, so a generation anyone has seen is in the cache.
        self._save(entry, state)
        with self._lock:
            if not self._is_current(entry):
                return None
            entry.state = state

        if not previous.is_known:
            _log.info(
                "schema.reflected",
                database=entry.name,
                tables=len(tables),
                generation=state.generation,
                fingerprint=fingerprint,
                duration_ms=duration_ms,
            )
        elif is_visible:
            _log.info(
                "schema.changed",
                database=entry.name,
                generation=state.generation,
                fingerprint=fingerprint,
                duration_ms=duration_ms,
                **diff,
            )
        else:
            # An index or a trigger: nothing a description shows.
            _log.debug(
                "schema.checked",
                database=entry.name,
                fingerprint=fingerprint,
                duration_ms=duration_ms,
            )
        if not is_visible:
            return None
        if self._on_change is not None:
            self._on_change(entry.name)
        return diff

    def _failed(self, entry: _Entry, error: BaseException) -> None:
        with self._lock:
            if not self._is_current(entry):
                return  # retired meanwhile: nobody waits for this one
            entry.failures += 1
            failures = entry.failures
        cause: BaseException = error
        if isinstance(error, sa.exc.DBAPIError) and error.orig is not None:
            # The DBAPI's own error says what happened without the SQL.
            cause = error.orig
        message = " ".join(str(cause).split()) or type(cause).__name__
        password = entry.spec.url.password
        if password:
            message = message.replace(str(password), MASK)
        _log.warning(
            "schema.reflect_failed",
            database=entry.name,
            error_class=type(cause).__name__,
            error=redact(message)[:_MAX_ERROR_CHARS],
            consecutive_failures=failures,
            generation=entry.state.generation,
        )

    def _on_demand(self, entry: _Entry) -> None:
        """Have the job check ``entry`` now and wait, rate-limited.

        A check already asked for and not done yet is waited for; a new
        one is asked for at most once per ``on_demand_gap``, so a client
        asking for a missing table in a loop cannot hammer the database.
        """
        with self._lock:
            if entry.checks_finished >= entry.demand_target:
                now = time.monotonic()
                if now - entry.demand_at < self._on_demand_gap:
                    return
                entry.demand_at = now
                entry.demand_target = entry.checks_started + 1
                # A running job arms its next run at once when it ends.
                if not entry.is_job_running and self._is_current(entry):
                    self._arm(entry, 0.0)
            target = entry.demand_target
            self._checked.wait_for(
                lambda: (
                    entry.checks_finished >= target
                    or not self._is_current(entry)
                ),
                timeout=self._on_demand_timeout,
            )

    # -- reads -------------------------------------------------------------

    def _entry(self, name: str) -> _Entry:
        with self._lock:
            entry = self._entries.get(name)
            known = sorted(self._entries)
        if entry is None:
            raise UnknownDatabaseError(
                f"no database named {name!r} is watched for schema"
                f" changes; known: {known}"
            )
        return entry

    def tables(self, name: str) -> list[str]:
        """Return the qualified names of the tables known for ``name``.

        Before the first check ends (and with no cache), waits for it,
        at most ``on_demand_timeout`` seconds.
        """
        entry = self._entry(name)
        if not entry.state.is_known:
            self._on_demand(entry)
        return list(self._entry(name).state.tables)

    def describe(self, name: str, table: str) -> dict[str, Any]:
        """Return the plain-data description of one table of ``name``.

        A table not known yet may have just been created: the database
        is checked on demand before :class:`UnknownTableError` is raised.
        """
        entry = self._entry(name)
        description = entry.state.tables.get(table)
        if description is None:
            self._on_demand(entry)
            known = self._entry(name).state.tables
            description = known.get(table)
            if description is None:
                matches = difflib.get_close_matches(
                    table, list(known), n=_CLOSE_MATCHES
                )
                raise UnknownTableError(
                    f"database {name!r} has no table {table!r} in its"
                    f" reflected schema; close matches: {matches}"
                )
        # Published descriptions are never changed in place (a new
        # reflection replaces the whole state), so no copy is needed.
        return description

    def generation(self, name: str) -> int:
        """Return how many visible schema changes ``name`` has seen."""
        return self._entry(name).state.generation

    def refresh(self, name: str) -> dict[str, Any] | None:
        """Check ``name`` now, in this thread; return the diff if changed.

        Waits for a check already running; not rate-limited, for
        operators and tests.
        """
        return self._check(self._entry(name))

    # -- the disk cache ------------------------------------------------

    def _load_cache(self, name: str, path: str) -> _State | None:
        """Return the cached state of ``name``, None if absent or bad."""
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as error:
            self._ignore_cache(
                name, path, f"unreadable: {type(error).__name__}: {error}"
            )
            return None
        try:
            content = json.loads(data)
        except ValueError as error:
            self._ignore_cache(name, path, f"not valid JSON: {error}")
            return None
        reason = _cache_problem(content, name)
        if reason is not None:
            self._ignore_cache(name, path, reason)
            return None

        tables = dict(sorted(content["tables"].items()))
        state = _State(
            tables=tables,
            fingerprint=content["fingerprint"],
            generation=content["generation"],
            source="cache",
        )
        _log.info(
            "schema.cache_loaded",
            database=name,
            path=path,
            tables=len(tables),
            generation=state.generation,
            saved_at=content.get("saved_at"),
        )
        return state

    def _ignore_cache(self, name: str, path: str, reason: str) -> None:
        _log.warning(
            "schema.cache_ignored",
            database=name,
            path=path,
            reason=redact(reason)[:_MAX_ERROR_CHARS],
        )

    def _save(self, entry: _Entry, state: _State) -> None:
        """Write ``state`` to the cache; warn once per database if not."""
        if self._cache_dir is None or entry.cache_path is None:
            return
        content = {
            "format_version": CACHE_FORMAT_VERSION,
            "database": entry.name,
            "fingerprint": state.fingerprint,
            "generation": state.generation,
            "saved_at": datetime.datetime.now(datetime.UTC).isoformat(),
            "tables": dict(state.tables),
        }
        data = json.dumps(content, sort_keys=True, default=str).encode()
        try:
            os.makedirs(self._cache_dir, mode=CACHE_DIR_MODE, exist_ok=True)
            atomic_write(entry.cache_path, data, mode=CACHE_FILE_MODE)
        except OSError as error:
            with self._lock:
                is_first = entry.name not in self._unwritable
                self._unwritable.add(entry.name)
            if is_first:
                _log.warning(
                    "schema.cache_unwritable",
                    database=entry.name,
                    path=entry.cache_path,
                    error_class=type(error).__name__,
                    error=redact(str(error))[:_MAX_ERROR_CHARS],
                )
            return
        with self._lock:
            self._unwritable.discard(entry.name)

    # -- shutdown ----------------------------------------------------------

    def close(self) -> None:
        """Stop every job, dispose the engines, release the pool.

        Does not wait for a reflection in flight: one stuck on a dead
        host ends within its engine's timeouts, and its result is
        dropped.  The scheduler itself stays the caller's.
        """
        with self._sync_lock:
            with self._lock:
                if self._is_closed:
                    return
                self._is_closed = True
                entries = list(self._entries.values())
                self._entries.clear()
                self._checked.notify_all()
            for entry in entries:
                self._remove_job(entry)
                entry.engine.dispose()
            # KeyError: the scheduler was configured again meanwhile.
            with contextlib.suppress(KeyError):
                self._scheduler.remove_executor(
                    self._executor_alias, shutdown=False
                )
            self._executor.shutdown(wait=False)


def _cache_problem(content: Any, name: str) -> str | None:
    """Return why ``content`` is not a usable cache of ``name``, or None."""
    if not isinstance(content, dict):
        return "not a JSON object"
    version = content.get("format_version")
    if version != CACHE_FORMAT_VERSION:
        return (
            f"format_version is {version!r}, this daemon reads"
            f" {CACHE_FORMAT_VERSION}"
        )
    if content.get("database") != name:
        return f"written for database {content.get('database')!r}"
    generation = content.get("generation")
    if type(generation) is not int or generation < 0:
        return f"generation is {generation!r}, not a count"
    if not isinstance(content.get("fingerprint"), str):
        return "fingerprint is missing"
    tables = content.get("tables")
    if not isinstance(tables, dict) or not all(
        isinstance(description, dict)
        and isinstance(description.get("columns"), list)
        for description in tables.values()
    ):
        return "tables are not table descriptions"
    return None
