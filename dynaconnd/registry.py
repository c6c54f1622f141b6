"""The registry core: immutable snapshots, and reloads applied as a diff.

A reload builds every engine it needs first, then publishes the new
snapshot with one assignment.  Readers take ``registry.snapshot`` once
and use that object, so nobody ever sees a half-built registry.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import types
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from dynaconnd.drain import EngineDrainer
from dynaconnd.engines import build_engine
from dynaconnd.errors import ConfigIssue, UnknownDatabaseError
from dynaconnd.logs import get_logger, redact

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping

    from dynaconnd.config import LoadedConfig
    from dynaconnd.errors import ConfigError
    from dynaconnd.spec import DatabaseSpec

__all__ = [
    "Instance",
    "Registry",
    "ReloadOutcome",
    "ReloadPlan",
    "Snapshot",
    "plan_reload",
    "unknown_database",
]

log = get_logger("registry")

#: How many changed engines are proven in parallel before a swap.
PROVE_WORKERS = 8


@dataclasses.dataclass(frozen=True, eq=False)
class Instance:
    """One live database: its spec and the engine built from it."""

    spec: DatabaseSpec
    engine: sa.Engine

    @property
    def name(self) -> str:
        """Return the section name the database is known by."""
        return self.spec.name


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """An immutable view of the registry at one generation."""

    generation: int
    instances: Mapping[str, Instance]

    def names(self) -> list[str]:
        """Return the database names in file order."""
        return list(self.instances)

    def get(self, name: str) -> Instance:
        """Return the instance called ``name`` or raise a clear error."""
        try:
            return self.instances[name]
        except KeyError:
            raise unknown_database(name, self.instances) from None


def unknown_database(
    name: str,
    known: Iterable[str],
    rejected: Mapping[str, tuple[ConfigIssue, ...]] | None = None,
) -> UnknownDatabaseError:
    """Build the error for a name the registry does not hold.

    A name whose section was rejected says why, rather than only that
    it is unknown.
    """
    import difflib

    issues = (rejected or {}).get(name)
    if issues:
        reasons = "; ".join(str(issue) for issue in issues)
        return UnknownDatabaseError(
            f"database {name!r} is not available: its section was"
            f" rejected: {reasons}"
        )
    names = sorted(known)
    close = difflib.get_close_matches(name, names, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    listing = ", ".join(names) if names else "none"
    return UnknownDatabaseError(
        f"unknown database {name!r}{hint} (known: {listing})"
    )


def _issues_as_data(
    issues: Iterable[ConfigIssue],
) -> list[dict[str, str | int | None]]:
    return [issue.as_dict() for issue in issues]


@dataclasses.dataclass(frozen=True)
class ReloadOutcome:
    """What one reload did, as a value clients and logs can read."""

    applied: bool
    generation: int
    previous_generation: int
    added: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()
    #: Sections that failed validation; each keeps its previous
    #: definition if it had one, and stays absent if it is new.
    rejected: Mapping[str, tuple[ConfigIssue, ...]] = dataclasses.field(
        default_factory=dict
    )
    kept: tuple[str, ...] = ()
    #: Problems with the file as a whole; nothing was applied.
    file_issues: tuple[ConfigIssue, ...] = ()
    #: New or changed engines that could not connect when proven.
    unreachable: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def has_changes(self) -> bool:
        """Return whether the snapshot changed."""
        return bool(self.added or self.changed or self.removed)

    def as_dict(self) -> dict[str, Any]:
        """Return the outcome as plain data, for a socket or a log event."""
        return {
            "applied": self.applied,
            "generation": self.generation,
            "previous_generation": self.previous_generation,
            "added": list(self.added),
            "changed": list(self.changed),
            "removed": list(self.removed),
            "unchanged": list(self.unchanged),
            "rejected": {
                name: _issues_as_data(issues)
                for name, issues in self.rejected.items()
            },
            "kept": list(self.kept),
            "file_issues": _issues_as_data(self.file_issues),
            "unreachable": dict(self.unreachable),
        }


def _prove(engine: sa.Engine) -> str | None:
    """Connect once; return the masked error, or None when it worked.

    SQLite is never proven: a file has no credentials to check, and
    connecting would create a missing file.
    """
    try:
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
    except (sa.exc.DBAPIError, OSError) as error:
        return redact(f"{error.__class__.__name__}: {error.args[0]}")
    return None


@dataclasses.dataclass(frozen=True)
class ReloadPlan:
    """What applying a configuration to a snapshot would do."""

    added: tuple[str, ...]
    changed: tuple[str, ...]
    removed: tuple[str, ...]
    unchanged: tuple[str, ...]
    kept: tuple[str, ...]


def plan_reload(config: LoadedConfig, snapshot: Snapshot) -> ReloadPlan:
    """Sort every section of ``config`` by what a reload does to it.

    A rejected section that the snapshot holds is kept as it was; one
    the snapshot lacks stays absent.
    """
    old = snapshot.instances
    added: list[str] = []
    changed: list[str] = []
    unchanged: list[str] = []
    for name, spec in config.specs.items():
        if name not in old:
            added.append(name)
        elif old[name].spec != spec:
            changed.append(name)
        else:
            unchanged.append(name)
    removed = [
        name
        for name in old
        if name not in config.specs and name not in config.rejected
    ]
    kept = [name for name in config.rejected if name in old]
    return ReloadPlan(
        tuple(added),
        tuple(changed),
        tuple(removed),
        tuple(unchanged),
        tuple(kept),
    )


class Registry:
    """The live set of databases, replaced whole on every reload."""

    def __init__(
        self,
        *,
        drain_timeout: float = 30.0,
        prove_changes: bool = True,
        engine_factory: Callable[[DatabaseSpec], sa.Engine] = build_engine,
        initial_generation: int = 0,
    ) -> None:
        self._snapshot = Snapshot(
            initial_generation, types.MappingProxyType({})
        )
        self._lock = threading.Lock()
        self._drainer = EngineDrainer(timeout=drain_timeout)
        self._prove_changes = prove_changes
        self._engine_factory = engine_factory
        self._last_outcome: ReloadOutcome | None = None

    @property
    def snapshot(self) -> Snapshot:
        """Return the current snapshot; it never changes once published."""
        return self._snapshot

    @property
    def generation(self) -> int:
        """Return the current generation; 0 before the first load."""
        return self._snapshot.generation

    def lookup(self, name: str) -> Instance:
        """Return the live instance ``name``, or say why there is none."""
        snapshot = self._snapshot
        instance = snapshot.instances.get(name)
        if instance is None:
            outcome = self._last_outcome
            rejected = outcome.rejected if outcome is not None else None
            raise unknown_database(name, snapshot.instances, rejected)
        return instance

    @property
    def last_outcome(self) -> ReloadOutcome | None:
        """Return what the most recent reload did, if any ran."""
        return self._last_outcome

    @property
    def draining(self) -> int:
        """Return how many replaced engines wait to be disposed."""
        return self._drainer.pending

    def apply(self, config: LoadedConfig) -> ReloadOutcome:
        """Make the registry match ``config``, changing only what differs."""
        with self._lock:
            return self._apply(config)

    def reject(self, error: ConfigError, *, path: str) -> ReloadOutcome:
        """Record a file that could not be used at all; change nothing."""
        generation = self._snapshot.generation
        outcome = ReloadOutcome(
            applied=False,
            generation=generation,
            previous_generation=generation,
            unchanged=tuple(self._snapshot.instances),
            file_issues=tuple(error.issues),
        )
        self._last_outcome = outcome
        log.error(
            "config.rejected",
            file=path,
            applied=False,
            generation=generation,
            errors=_issues_as_data(error.issues),
        )
        return outcome

    def close(self) -> None:
        """Dispose every engine, live and retired; the registry is empty."""
        with self._lock:
            old = self._snapshot
            self._snapshot = Snapshot(
                old.generation + 1, types.MappingProxyType({})
            )
            for instance in old.instances.values():
                self._drainer.retire(instance.name, instance.engine)
            self._drainer.close()

    def _apply(self, config: LoadedConfig) -> ReloadOutcome:
        old = self._snapshot.instances
        plan = plan_reload(config, self._snapshot)
        added, changed, removed = plan.added, plan.changed, plan.removed
        unchanged, kept = plan.unchanged, plan.kept

        # Build new engines before touching the live snapshot.
        fresh = {
            name: Instance(spec, self._engine_factory(spec))
            for name, spec in config.specs.items()
            if name in added or name in changed
        }
        unreachable = self._prove(
            {
                name: fresh[name]
                for name in changed
                if self._prove_changes and fresh[name].spec.backend != "sqlite"
            }
        )

        # Publish, in file order, with one assignment.
        instances: dict[str, Instance] = {}
        for name in config.specs:
            instances[name] = fresh.get(name) or old[name]
        for name in kept:
            instances[name] = old[name]
        previous = self._snapshot.generation
        has_changes = bool(added or changed or removed)
        generation = previous + 1 if has_changes else previous
        self._snapshot = Snapshot(
            generation, types.MappingProxyType(instances)
        )

        # Retire what the new snapshot no longer holds.
        for name in [*changed, *removed]:
            self._drainer.retire(name, old[name].engine)

        outcome = ReloadOutcome(
            applied=True,
            generation=generation,
            previous_generation=previous,
            added=added,
            changed=changed,
            removed=removed,
            unchanged=unchanged,
            rejected=dict(config.rejected),
            kept=kept,
            unreachable=unreachable,
        )
        self._last_outcome = outcome
        self._log(outcome, path=config.path)
        return outcome

    def _prove(self, instances: Mapping[str, Instance]) -> dict[str, str]:
        if not instances:
            return {}
        workers = min(PROVE_WORKERS, len(instances))
        with concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="dynaconn-prove"
        ) as pool:
            results = dict(
                zip(
                    instances,
                    pool.map(
                        _prove,
                        [instance.engine for instance in instances.values()],
                    ),
                    strict=True,
                )
            )
        failures = {name: error for name, error in results.items() if error}
        for name, error in failures.items():
            log.warning("engine.unproven", database=name, error=error)
        return failures

    @staticmethod
    def _log(outcome: ReloadOutcome, *, path: str) -> None:
        fields = {
            "file": path,
            "generation": outcome.generation,
            "added": list(outcome.added),
            "changed": list(outcome.changed),
            "removed": list(outcome.removed),
            "unchanged": len(outcome.unchanged),
        }
        if outcome.rejected:
            log.error(
                "config.rejected",
                applied=True,
                kept=list(outcome.kept),
                errors=[
                    issue.as_dict()
                    for issues in outcome.rejected.values()
                    for issue in issues
                ],
                **fields,
            )
        else:
            log.info("reload.applied", **fields)
