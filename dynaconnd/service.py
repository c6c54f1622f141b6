"""What the daemon serves over its socket: plain data, never live objects.

Each public method here is one call a client can make; the names are
``protocol.SERVICE_METHODS``.  The socket server runs every connection
in its own thread, so methods only read published, immutable state or
hand work to the daemon's main loop.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from dynaconnd import editing
from dynaconnd._version import __version__
from dynaconnd.config import parse_config
from dynaconnd.errors import (
    ConfigError,
    UnknownDatabaseError,
    WritesDisabledError,
)
from dynaconnd.protocol import PROTOCOL_VERSION, spec_to_wire
from dynaconnd.registry import plan_reload

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from dynaconnd.health import HealthMonitor
    from dynaconnd.registry import Registry
    from dynaconnd.schema_monitor import SchemaMonitor
    from dynaconnd.spec import DatabaseSpec

__all__ = ["RegistryService"]


class RegistryService:
    """The daemon's answers to clients, built from its live state."""

    def __init__(
        self,
        *,
        registry: Registry,
        health: HealthMonitor,
        schemas: SchemaMonitor,
        config_path: str,
        request_reload: Callable[[], dict[str, Any]],
        epoch: Callable[[], int],
        allow_writes: bool = False,
    ) -> None:
        self._registry = registry
        self._health = health
        self._schemas = schemas
        self._config_path = config_path
        self._request_reload = request_reload
        self._epoch = epoch
        self._allow_writes = allow_writes
        self._write_lock = threading.Lock()
        self._described: dict[str, tuple[DatabaseSpec, dict[str, Any]]] = {}

    def hello(self, client_protocol: int) -> dict[str, Any]:
        """Introduce the daemon: its protocol, version and generation."""
        return {
            "protocol": PROTOCOL_VERSION,
            "version": __version__,
            "generation": self._registry.generation,
            "epoch": self._epoch(),
            "client_protocol": client_protocol,
        }

    def generation(self) -> int:
        """Return the registry generation."""
        return self._registry.generation

    def epoch(self) -> int:
        """Return the counter that rises on any registry or schema change."""
        return self._epoch()

    def names(self) -> list[str]:
        """Return the database names in file order."""
        return self._registry.snapshot.names()

    def describe(self, name: str) -> dict[str, Any]:
        """Return a masked description of one database."""
        spec = self._registry.lookup(name).spec
        cached = self._described.get(name)
        if cached is None or cached[0] is not spec:
            # Rendering the masked URL and the option dicts is most of a
            # describe() call; a spec never changes, so do it once.
            cached = (spec, spec.describe())
            self._described[name] = cached
        return {
            **cached[1],
            "schema_generation": self._schema_generation(name),
        }

    def connection_spec(self, name: str) -> dict[str, Any]:
        """Return what a client needs to build its own engine for ``name``."""
        return spec_to_wire(self._registry.lookup(name).spec)

    def specs(self) -> dict[str, Any]:
        """Return every connection spec and schema generation at once."""
        snapshot = self._registry.snapshot
        return {
            "generation": snapshot.generation,
            "epoch": self._epoch(),
            "specs": {
                name: spec_to_wire(instance.spec)
                for name, instance in snapshot.instances.items()
            },
            "schema_generations": {
                name: self._schema_generation(name)
                for name in snapshot.instances
            },
        }

    def tables(self, name: str) -> list[str]:
        """Return the reflected tables and views of ``name``."""
        self._registry.lookup(name)
        return self._schemas.tables(name)

    def table_description(self, name: str, table: str) -> dict[str, Any]:
        """Return one table's description as plain data."""
        self._registry.lookup(name)
        return self._schemas.describe(name, table)

    def schema_generation(self, name: str) -> int:
        """Return how many schema changes ``name`` has seen."""
        self._registry.lookup(name)
        return self._schema_generation(name)

    def _schema_generation(self, name: str) -> int:
        # A reload publishes the new snapshot before the schema monitor
        # takes the new database in: until then it has seen no change.
        try:
            return self._schemas.generation(name)
        except UnknownDatabaseError:
            return 0

    def last_outcome(self) -> dict[str, Any]:
        """Return the most recent reload's outcome."""
        outcome = self._registry.last_outcome
        return outcome.as_dict() if outcome is not None else {}

    def reload(self) -> dict[str, Any]:
        """Read source.ini now and return what the reload did."""
        return self._request_reload()

    def health(self) -> dict[str, Any]:
        """Return every database's health record."""
        return self._health.health()

    def ping(self, name: str) -> dict[str, Any]:
        """Check ``name`` now and return the probe's result."""
        self._registry.lookup(name)
        return self._health.ping(name)

    def check(self, text: str) -> dict[str, Any]:
        """Dry-run ``text`` as source.ini against the live registry."""
        try:
            config = parse_config(text.encode(), path=self._config_path)
        except ConfigError as error:
            return {
                "ok": False,
                "file_issues": [issue.as_dict() for issue in error.issues],
                "added": [],
                "changed": [],
                "removed": [],
                "unchanged": [],
                "rejected": {},
                "kept": [],
            }
        plan = plan_reload(config, self._registry.snapshot)
        return {
            "ok": not config.rejected,
            "file_issues": [],
            "added": list(plan.added),
            "changed": list(plan.changed),
            "removed": list(plan.removed),
            "unchanged": list(plan.unchanged),
            "kept": list(plan.kept),
            "rejected": {
                name: [issue.as_dict() for issue in issues]
                for name, issues in config.rejected.items()
            },
        }

    def add_instance(
        self,
        name: str,
        data: Mapping[str, str | int | None],
        overwrite: bool = False,
    ) -> dict[str, Any]:
        """Add a section to source.ini and return the reload's outcome."""
        with self._writing():
            editing.add_section(
                self._config_path, name, data, overwrite=overwrite
            )
            return self._request_reload()

    def update_instance(
        self, name: str, data: Mapping[str, str | int | None]
    ) -> dict[str, Any]:
        """Change a section of source.ini and return the outcome."""
        with self._writing():
            editing.update_section(self._config_path, name, data)
            return self._request_reload()

    def remove_instance(self, name: str) -> dict[str, Any]:
        """Remove a section from source.ini and return the outcome."""
        with self._writing():
            editing.remove_section(self._config_path, name)
            return self._request_reload()

    def _writing(self) -> threading.Lock:
        if not self._allow_writes:
            raise WritesDisabledError(
                "this dynaconnd does not change source.ini for clients;"
                " start it with --allow-writes to permit add, update and"
                " remove"
            )
        return self._write_lock
