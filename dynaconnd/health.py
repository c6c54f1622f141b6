"""Health checks: probes, the up/slow/down state machine, the monitor.

A probe connects on an engine of its own (no pool, so a hung host never
holds a connection the apps need) and runs ``SELECT 1`` with a connect
timeout handed to the driver and a statement timeout where the server
has one.  :class:`HealthState` turns probe results into a state with
rise and fall counts and a backoff; :class:`HealthMonitor` runs one
scheduler job per database and logs one ``health.changed`` event per
transition.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import itertools
import math
import random
import threading
import time
import urllib.parse
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from apscheduler.executors.pool import ThreadPoolExecutor

from dynaconnd.errors import UnknownDatabaseError
from dynaconnd.logs import MASK, get_logger, redact
from dynaconnd.scheduling import add_database_job, arm_job, remove_job

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from apscheduler.schedulers.base import BaseScheduler
    from sqlalchemy.engine import URL, Connection, Engine

    from dynaconnd.spec import DatabaseSpec

__all__ = [
    "DEFAULT_FALL",
    "DEFAULT_HISTORY",
    "DEFAULT_JITTER",
    "DEFAULT_MAX_WORKERS",
    "DEFAULT_RISE",
    "DEFAULT_SLOW_MS",
    "DOWN",
    "MAX_BACKOFF_FACTOR",
    "MIN_PG_CONNECT_TIMEOUT",
    "SLOW",
    "STATES",
    "UNKNOWN",
    "UP",
    "HealthMonitor",
    "HealthState",
    "ProbeResult",
    "Transition",
    "build_probe_engine",
    "probe",
    "probe_connect_args",
]

UNKNOWN = "unknown"
UP = "up"
SLOW = "slow"
DOWN = "down"
STATES = (UNKNOWN, UP, SLOW, DOWN)

DEFAULT_SLOW_MS = 1000.0
DEFAULT_RISE = 2
DEFAULT_FALL = 3
DEFAULT_HISTORY = 20
DEFAULT_JITTER = 0.2
# Each probe of a host that never answers holds a thread for its whole
# timeout; enough threads that a hundred such hosts leave room for the
# healthy ones.  Threads are only started when needed.
DEFAULT_MAX_WORKERS = 128
# Without an explicit max_backoff, a database that stays down is checked
# at most this many intervals apart.
MAX_BACKOFF_FACTOR = 4.0
# libpq, and psycopg after it, round connect_timeout to whole seconds
# and raise anything below 2 to 2.
MIN_PG_CONNECT_TIMEOUT = 2
# 2 ** 32 intervals is beyond any max_backoff; the cap only keeps the
# power from overflowing a float during a very long outage.
_MAX_BACKOFF_STEPS = 32
_MAX_ERROR_CHARS = 500

_PING: sa.Select[Any] = sa.select(sa.literal_column("1"))

_log = get_logger("health")


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """The outcome of one probe; ``error`` is masked and never a secret."""

    ok: bool
    latency_ms: float
    error_class: str | None = None
    error: str | None = None
    checked_at: float = dataclasses.field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        """Return the result as plain data."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Transition:
    """One change of state, caused by ``result``."""

    previous: str
    current: str
    at: float
    result: ProbeResult
    consecutive_failures: int


def probe_connect_args(url: URL, *, timeout: float) -> dict[str, Any]:
    """Return the driver arguments that bound a probe to ``timeout``."""
    backend = url.get_backend_name()
    driver = url.get_driver_name()
    whole_seconds = max(1, math.ceil(timeout))

    if backend == "postgresql":
        # The statement timeout travels with the connection, so no extra
        # round trip is spent setting it.
        options = f"-c statement_timeout={max(1, round(timeout * 1000))}"
        existing = url.query.get("options")
        if isinstance(existing, str) and existing:
            options = f"{existing} {options}"
        return {
            "connect_timeout": max(MIN_PG_CONNECT_TIMEOUT, whole_seconds),
            "options": options,
        }
    if backend in {"mysql", "mariadb"}:
        # PyMySQL takes fractions of a second; mysqlclient only integers.
        limit: float = timeout if driver == "pymysql" else whole_seconds
        return {
            "connect_timeout": limit,
            "read_timeout": limit,
            "write_timeout": limit,
        }
    if backend == "sqlite":
        return {"timeout": timeout}
    return {}


def _read_only_sqlite(url: URL) -> URL:
    """Return ``url`` opened with ``mode=rw``, which never creates a file.

    A probe must not create the empty file a missing database would
    otherwise become, and then call it healthy.
    """
    path = url.database
    if not path or path == ":memory:" or path.startswith("file:"):
        return url
    return url.set(
        database="file:" + urllib.parse.quote(path),
        query={**url.query, "mode": "rw", "uri": "true"},
    )


def build_probe_engine(spec: DatabaseSpec) -> Engine:
    """Return an unpooled engine for probing ``spec``'s database.

    It is separate from the engine the apps' connections come from, so
    a hung host never occupies a connection of that pool.
    """
    url = spec.url
    if spec.backend == "sqlite":
        url = _read_only_sqlite(url)
    return sa.create_engine(
        url,
        poolclass=sa.pool.NullPool,
        connect_args=probe_connect_args(
            url, timeout=spec.schedule.health_timeout
        ),
    )


def _limit_statement_time(connection: Connection, timeout: float) -> None:
    """Set MariaDB's statement timeout, which has no connect option."""
    dialect = connection.dialect
    if dialect.name == "mysql" and getattr(dialect, "is_mariadb", False):
        connection.exec_driver_sql(
            "SET SESSION max_statement_time = %s", (float(timeout),)
        )


def _describe_error(error: BaseException, engine: Engine) -> tuple[str, str]:
    """Return the class name and masked message of a probe's error."""
    cause: BaseException = error
    if isinstance(error, sa.exc.DBAPIError) and error.orig is not None:
        # The DBAPI's own error says what happened without the SQL and
        # the link SQLAlchemy appends.
        cause = error.orig
    text = str(cause)
    if len(cause.args) == 2 and isinstance(cause.args[0], int):
        # MySQL drivers raise (code, message); say it as a sentence.
        text = f"{cause.args[1]} (error {cause.args[0]})"
    message = " ".join(text.split()) or type(cause).__name__
    password = engine.url.password
    if password:
        message = message.replace(str(password), MASK)
    return type(cause).__name__, redact(message)[:_MAX_ERROR_CHARS]


def probe(engine: Engine, *, timeout: float) -> ProbeResult:
    """Connect, run ``SELECT 1`` and return how it went.

    The engine's connect arguments bound the connection attempt and,
    on PostgreSQL, the statement (see build_probe_engine); ``timeout``
    sets the statement limit MariaDB can only be given in a session.
    """
    checked_at = time.time()
    started = time.perf_counter()
    try:
        with engine.connect() as connection:
            _limit_statement_time(connection, timeout)
            connection.execute(_PING).scalar()
    # DBAPIError covers OperationalError and the driver's own timeouts;
    # OSError covers TimeoutError and sockets failing outside the DBAPI;
    # sa.exc.TimeoutError is a pool that could not hand out a connection.
    except (sa.exc.DBAPIError, sa.exc.TimeoutError, OSError) as error:
        error_class, message = _describe_error(error, engine)
        return ProbeResult(
            ok=False,
            latency_ms=(time.perf_counter() - started) * 1000.0,
            error_class=error_class,
            error=message,
            checked_at=checked_at,
        )
    return ProbeResult(
        ok=True,
        latency_ms=(time.perf_counter() - started) * 1000.0,
        checked_at=checked_at,
    )


class HealthState:
    """The health of one database, fed one probe result at a time.

    Rules:

    - From ``unknown``, the first successful probe sets ``up`` (or
      ``slow``) at once: a connection that answered is proof enough, and
      a starting daemon should not report ``unknown`` for long.  Failures
      need ``fall`` in a row to set ``down``, from any state.
    - From ``down``, ``rise`` successes in a row set ``up`` or ``slow``.
    - Between ``up`` and ``slow`` (latency above ``slow_ms``), ``rise``
      probes in a row on the other side of the threshold are needed.
    - While ``down`` and failing, the next probe waits ``interval``
      doubled per failure beyond ``fall``, at most ``max_backoff``
      (default: four intervals), spread by +/- ``jitter``; after a
      success, or in any other state, it waits ``interval``.
    """

    def __init__(
        self,
        *,
        interval: float,
        slow_ms: float = DEFAULT_SLOW_MS,
        rise: int = DEFAULT_RISE,
        fall: int = DEFAULT_FALL,
        history: int = DEFAULT_HISTORY,
        max_backoff: float | None = None,
        jitter: float = DEFAULT_JITTER,
        rng: random.Random | None = None,
        now: float | None = None,
    ) -> None:
        for label, count in (("rise", rise), ("fall", fall)):
            if count < 1:
                raise ValueError(f"{label} must be at least 1, not {count}")
        if history < 1:
            raise ValueError(f"history must be at least 1, not {history}")
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), not {jitter}")
        if max_backoff is not None and max_backoff <= 0:
            raise ValueError(
                f"max_backoff must be positive, not {max_backoff}"
            )

        self.interval = interval
        self.slow_ms = slow_ms
        self.rise = rise
        self.fall = fall
        self.jitter = jitter
        self._max_backoff = max_backoff
        self._rng = rng or random.Random()

        self.state = UNKNOWN
        self.since = time.time() if now is None else now
        self.consecutive_failures = 0
        self.consecutive_successes = 0
        # Successes in a row on the same side of the slow threshold.
        self._same_speed = 0
        self._last_speed: str | None = None
        self.last_result: ProbeResult | None = None
        self.last_failure: ProbeResult | None = None
        self._history: collections.deque[ProbeResult] = collections.deque(
            maxlen=history
        )

    @property
    def interval(self) -> float:
        """Return the normal time between two probes, in seconds."""
        return self._interval

    @interval.setter
    def interval(self, value: float) -> None:
        if value <= 0:
            raise ValueError(f"interval must be positive, not {value}")
        self._interval = value

    @property
    def max_backoff(self) -> float:
        """Return the longest wait between two probes while down."""
        limit = self._max_backoff
        if limit is None:
            limit = MAX_BACKOFF_FACTOR * self.interval
        return max(limit, self.interval)

    @property
    def history(self) -> tuple[ProbeResult, ...]:
        """Return the most recent results, oldest first."""
        return tuple(self._history)

    def record(self, result: ProbeResult) -> Transition | None:
        """Take in one probe result; return the transition it caused."""
        self.last_result = result
        self._history.append(result)

        if not result.ok:
            self.last_failure = result
            self.consecutive_failures += 1
            self.consecutive_successes = 0
            self._same_speed = 0
            self._last_speed = None
            if self.state != DOWN and self.consecutive_failures >= self.fall:
                return self._move(DOWN, result)
            return None

        self.consecutive_failures = 0
        self.consecutive_successes += 1
        speed = SLOW if result.latency_ms > self.slow_ms else UP
        if speed == self._last_speed:
            self._same_speed += 1
        else:
            self._same_speed = 1
            self._last_speed = speed

        if self.state == UNKNOWN:
            return self._move(speed, result)
        if self.state == DOWN:
            if self.consecutive_successes >= self.rise:
                return self._move(speed, result)
            return None
        if speed != self.state and self._same_speed >= self.rise:
            return self._move(speed, result)
        return None

    def _move(self, current: str, result: ProbeResult) -> Transition:
        transition = Transition(
            previous=self.state,
            current=current,
            at=result.checked_at,
            result=result,
            consecutive_failures=self.consecutive_failures,
        )
        self.state = current
        self.since = result.checked_at
        return transition

    def backoff_bounds(self) -> tuple[float, float]:
        """Return the range the next delay is drawn from."""
        if self.state != DOWN or self.consecutive_failures == 0:
            return self.interval, self.interval
        steps = min(
            max(0, self.consecutive_failures - self.fall), _MAX_BACKOFF_STEPS
        )
        base = min(self.max_backoff, self.interval * 2.0**steps)
        return (
            base * (1.0 - self.jitter),
            min(self.max_backoff, base * (1.0 + self.jitter)),
        )

    def next_delay(self) -> float:
        """Return the seconds to wait before the next probe."""
        low, high = self.backoff_bounds()
        if low == high:
            return low
        return self._rng.uniform(low, high)

    def as_dict(self) -> dict[str, Any]:
        """Return the state as plain data, for clients and logs."""
        last = self.last_result
        failure = self.last_failure
        return {
            "state": self.state,
            "since": self.since,
            "last_latency_ms": None if last is None else last.latency_ms,
            "last_check": None if last is None else last.checked_at,
            "last_error": None if failure is None else failure.error,
            "last_error_class": (
                None if failure is None else failure.error_class
            ),
            "last_error_at": None if failure is None else failure.checked_at,
            "consecutive_failures": self.consecutive_failures,
            "history": [result.as_dict() for result in self._history],
        }


@dataclasses.dataclass(eq=False)
class _Entry:
    """One database under watch: its spec, probe engine, job and state."""

    name: str
    spec: DatabaseSpec
    engine: Engine
    job_id: str
    state: HealthState


_monitor_numbers = itertools.count(1)


class HealthMonitor:
    """Run one health job per database on ``scheduler``.

    Probes run on an executor of their own (threads ``dynaconn-health``),
    so a slow re-reflection never delays a health check, and up to
    ``max_workers`` hosts may hang at once without delaying the others.
    Each job probes, records the result, then sets its own next run:
    ``interval`` later, or the backoff while down.  The job's interval
    trigger only matters when a run was missed.
    """

    def __init__(
        self,
        scheduler: BaseScheduler,
        *,
        slow_ms: float = DEFAULT_SLOW_MS,
        rise: int = DEFAULT_RISE,
        fall: int = DEFAULT_FALL,
        history: int = DEFAULT_HISTORY,
        max_backoff: float | None = None,
        jitter: float = DEFAULT_JITTER,
        max_workers: int = DEFAULT_MAX_WORKERS,
        engine_factory: Callable[[DatabaseSpec], Engine] = build_probe_engine,
    ) -> None:
        self._scheduler = scheduler
        self._state_options: dict[str, Any] = {
            "slow_ms": slow_ms,
            "rise": rise,
            "fall": fall,
            "history": history,
            "max_backoff": max_backoff,
            "jitter": jitter,
        }
        # Checked once here, so a bad option fails the monitor, not a job.
        HealthState(interval=1.0, **self._state_options)
        self._engine_factory = engine_factory
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._job_numbers = itertools.count(1)
        self._is_closed = False

        self._executor_alias = f"dynaconn-health-{next(_monitor_numbers)}"
        self._executor = ThreadPoolExecutor(
            max_workers, pool_kwargs={"thread_name_prefix": "dynaconn-health"}
        )
        scheduler.add_executor(self._executor, alias=self._executor_alias)

    def sync(self, specs: Mapping[str, DatabaseSpec]) -> None:
        """Watch exactly the databases in ``specs``.

        A new database is probed at once; a changed one gets a new job
        and probe engine but keeps its state; a removed one loses both.
        """
        with self._sync_lock:
            with self._lock:
                if self._is_closed:
                    raise RuntimeError("the health monitor is closed")
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
                self._entries.update(fresh)

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
                "health.synced", added=added, changed=changed, removed=removed
            )

    def _build_entry(
        self, name: str, spec: DatabaseSpec, old: _Entry | None
    ) -> _Entry | None:
        try:
            engine = self._engine_factory(spec)
        # A missing driver or a URL SQLAlchemy cannot use: the registry
        # reports those too; the monitor says once that it cannot probe.
        except (ImportError, sa.exc.ArgumentError) as error:
            _log.error(
                "health.unavailable",
                database=name,
                error_class=type(error).__name__,
                error=redact(str(error)),
            )
            return None
        interval = spec.schedule.health_interval
        if old is None:
            state = HealthState(interval=interval, **self._state_options)
        else:
            state = old.state
            with self._lock:
                state.interval = interval
        return _Entry(
            name=name,
            spec=spec,
            engine=engine,
            job_id=f"health:{name}:{next(self._job_numbers)}",
            state=state,
        )

    def _add_job(self, entry: _Entry) -> None:
        add_database_job(
            self._scheduler,
            self._run,
            job_id=entry.job_id,
            name=f"health check of {entry.name}",
            interval=entry.spec.schedule.health_interval,
            executor=self._executor_alias,
            args=(entry,),
        )

    def _remove_job(self, entry: _Entry) -> None:
        remove_job(self._scheduler, entry.job_id)

    def _arm(self, entry: _Entry, delay: float | None) -> None:
        """Set the job's next run ``delay`` seconds from now; None pauses."""
        arm_job(self._scheduler, entry.job_id, delay)

    def _is_current(self, entry: _Entry) -> bool:
        with self._lock:
            return (
                not self._is_closed and self._entries.get(entry.name) is entry
            )

    def _run(self, entry: _Entry) -> None:
        """Probe one database, record the result and set the next run."""
        if not self._is_current(entry):
            return

        # No second run may start while this one waits on a dead host;
        # the end of this run sets the next one.
        self._arm(entry, None)
        started = time.monotonic()
        delay: float | None = entry.state.interval
        try:
            result = probe(
                entry.engine, timeout=entry.spec.schedule.health_timeout
            )
            delay = self._record(entry, result)
        finally:
            if delay is not None:
                # Count the wait from this run's start, so a host that
                # hangs for the whole timeout is still probed every
                # interval: down within interval x fall + timeout.
                elapsed = time.monotonic() - started
                self._arm(entry, max(0.0, delay - elapsed))

    def _record(self, entry: _Entry, result: ProbeResult) -> float | None:
        """Record ``result``; return the next delay, None if retired."""
        with self._lock:
            if self._is_closed or self._entries.get(entry.name) is not entry:
                return None
            transition = entry.state.record(result)
            state = entry.state.state
            failures = entry.state.consecutive_failures
            delay = entry.state.next_delay()

        if transition is not None:
            # A database going down is a failure that will be retried.
            emit = _log.warning if transition.current == "down" else _log.info
            emit(
                "health.changed",
                database=entry.name,
                to=transition.current,
                latency_ms=round(result.latency_ms, 3),
                error_class=result.error_class,
                error=result.error,
                consecutive_failures=failures,
                **{"from": transition.previous},
            )
        else:
            _log.debug(
                "health.checked",
                database=entry.name,
                state=state,
                ok=result.ok,
                latency_ms=round(result.latency_ms, 3),
                error_class=result.error_class,
                consecutive_failures=failures,
                next_in=round(delay, 3),
            )
        return delay

    def state_counts(self) -> dict[str, int]:
        """Return how many databases are in each state; cheap to call."""
        counts: dict[str, int] = {}
        with self._lock:
            for entry in self._entries.values():
                state = entry.state.state
                counts[state] = counts.get(state, 0) + 1
        return counts

    def health(self) -> dict[str, dict[str, Any]]:
        """Return every watched database's health as plain data."""
        with self._lock:
            return {
                name: entry.state.as_dict()
                for name, entry in sorted(self._entries.items())
            }

    def ping(self, name: str) -> dict[str, Any]:
        """Probe ``name`` now, record the result and return it.

        Raises :class:`UnknownDatabaseError` for a database not watched.
        """
        with self._lock:
            entry = self._entries.get(name)
            known = sorted(self._entries)
        if entry is None:
            raise UnknownDatabaseError(
                f"no database named {name!r} is watched; known: {known}"
            )

        result = probe(
            entry.engine, timeout=entry.spec.schedule.health_timeout
        )
        delay = self._record(entry, result)
        if delay is not None:
            self._pull_in(entry, delay)
        with self._lock:
            state = entry.state.state
        return {"database": name, "state": state, **result.as_dict()}

    def _pull_in(self, entry: _Entry, delay: float) -> None:
        """Bring a backed-off job's next run forward after a ping."""
        job = self._scheduler.get_job(entry.job_id)
        if job is None or job.next_run_time is None:
            return  # gone, or running now: its end sets the next run
        wanted = datetime.datetime.now(datetime.UTC) + datetime.timedelta(
            seconds=delay
        )
        if job.next_run_time > wanted:
            self._arm(entry, delay)

    def close(self) -> None:
        """Stop every job, dispose the probe engines, release the pool.

        Does not wait for a probe in flight; each one ends within its
        own timeouts.  The scheduler itself stays the caller's.
        """
        with self._sync_lock:
            with self._lock:
                if self._is_closed:
                    return
                self._is_closed = True
                entries = list(self._entries.values())
                self._entries.clear()
            for entry in entries:
                self._remove_job(entry)
                entry.engine.dispose()
            # KeyError: the scheduler was configured again meanwhile.
            with contextlib.suppress(KeyError):
                self._scheduler.remove_executor(
                    self._executor_alias, shutdown=False
                )
            self._executor.shutdown(wait=False)
