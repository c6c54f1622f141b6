"""``DatabaseRegistry``: the registry apps use, reading source.ini itself."""

from __future__ import annotations

import os
import threading
import weakref
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from magenta_dynaconn._scope import SessionScopeMixin

# The reader, the registry and the model builder are imported where they
# are used: an app that only talks to the daemon never needs them, and
# importing them costs a noticeable part of a cold start.

if TYPE_CHECKING:
    from collections.abc import Mapping

    from dynaconnd.config import LoadedConfig
    from dynaconnd.registry import Instance, ReloadOutcome
    from magenta_dynaconn._models import ModelFactory

__all__ = ["DatabaseRegistry"]

_live_registries: weakref.WeakSet[DatabaseRegistry] = weakref.WeakSet()


def _forget_pools_after_fork() -> None:
    # A forked child must not share the parent's sockets: drop every pool
    # without closing it (closing would end the parent's connections too).
    for registry in list(_live_registries):
        registry._after_fork()


os.register_at_fork(after_in_child=_forget_pools_after_fork)


class DatabaseRegistry(SessionScopeMixin):
    """Databases named in ``source.ini``, as engines, sessions and models.

    The file is read in this process; :meth:`connect` returns a registry
    with the same interface that a running ``dynaconnd`` keeps current.
    """

    def __init__(
        self,
        source: str | os.PathLike[str] = "source.ini",
        *,
        drain_timeout: float = 30.0,
        monitor_health: bool = False,
    ) -> None:
        """Read ``source`` and build an engine for each valid section.

        With ``monitor_health``, every database is also checked in the
        background on its ``health_interval``, as the daemon does;
        otherwise :meth:`health` reports what :meth:`ping` found.
        """
        from dynaconnd.config import load_config
        from dynaconnd.health import HealthMonitor
        from dynaconnd.registry import Registry
        from dynaconnd.scheduling import make_scheduler

        self.source = os.path.abspath(source)
        self._registry = Registry(drain_timeout=drain_timeout)
        self._factories: dict[str, tuple[Instance, ModelFactory]] = {}
        self._lock = threading.Lock()
        self._scheduler = make_scheduler(max_workers=4)
        self._health = HealthMonitor(self._scheduler)
        self._apply(load_config(self.source))
        if monitor_health:
            self._scheduler.start()
        _live_registries.add(self)

    @classmethod
    def connect(
        cls,
        socket: str | None = None,
        authkey_file: str | None = None,
    ) -> Any:
        """Return a registry backed by the ``dynaconnd`` daemon."""
        from magenta_dynaconn._remote import RemoteRegistry

        return RemoteRegistry(socket=socket, authkey_file=authkey_file)

    def __repr__(self) -> str:
        return (
            f"<DatabaseRegistry source={self.source!r}"
            f" generation={self.generation}"
            f" databases={self.list_names()!r}>"
        )

    @property
    def generation(self) -> int:
        """Return the registry generation; it rises on every change."""
        return self._registry.generation

    def list_names(self) -> list[str]:
        """Return the database names, in the order of source.ini."""
        return self._registry.snapshot.names()

    def new_session(self, name: str) -> Session:
        """Return a new ORM session on the database called ``name``."""
        instance = self._registry.snapshot.instances.get(name)
        if instance is None:
            instance = self._registry.lookup(name)
        return Session(instance.engine)

    def get_db_instance(self, name: str, table: str) -> type[Any]:
        """Return the ORM class of ``table`` in the database ``name``."""
        return self._factory(name).get(table)

    def tables(self, name: str) -> list[str]:
        """Return the tables and views of ``name`` that can be reflected."""
        instance = self._registry.lookup(name)
        from dynaconnd import schema

        return schema.list_tables(instance.engine, instance.spec.reflection)

    def describe(self, name: str) -> dict[str, Any]:
        """Return a description of ``name`` with its password masked."""
        return self._registry.lookup(name).spec.describe()

    def ping(self, name: str) -> dict[str, Any]:
        """Connect to ``name`` now, record the result and return it."""
        self._registry.lookup(name)
        return self._health.ping(name)

    def health(self) -> dict[str, dict[str, Any]]:
        """Return each database's state, latency, errors and history."""
        return self._health.health()

    def reload(self) -> ReloadOutcome:
        """Read source.ini again and apply what changed."""
        from dynaconnd.config import load_config
        from dynaconnd.errors import ConfigError

        try:
            config = load_config(self.source)
        except ConfigError as error:
            return self._registry.reject(error, path=self.source)
        return self._apply(config)

    def last_outcome(self) -> ReloadOutcome | None:
        """Return what the most recent reload did."""
        return self._registry.last_outcome

    def add_instance(
        self,
        name: str,
        data: Mapping[str, str | int | None],
        *,
        overwrite: bool = False,
    ) -> ReloadOutcome:
        """Add a section to source.ini, then apply it."""
        from dynaconnd import editing

        editing.add_section(self.source, name, data, overwrite=overwrite)
        return self.reload()

    def update_instance(
        self, name: str, data: Mapping[str, str | int | None]
    ) -> ReloadOutcome:
        """Change keys of a section in source.ini, then apply it."""
        from dynaconnd import editing

        editing.update_section(self.source, name, data)
        return self.reload()

    def remove_instance(self, name: str) -> ReloadOutcome:
        """Remove a section from source.ini, then apply that."""
        from dynaconnd import editing

        editing.remove_section(self.source, name)
        return self.reload()

    def close(self) -> None:
        """Dispose every engine; the registry cannot be used afterwards."""
        _live_registries.discard(self)
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        self._health.close()
        self._registry.close()

    def __enter__(self) -> DatabaseRegistry:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _apply(self, config: LoadedConfig) -> ReloadOutcome:
        outcome = self._registry.apply(config)
        self._health.sync(
            {
                name: instance.spec
                for name, instance in self._registry.snapshot.instances.items()
            }
        )
        return outcome

    def _factory(self, name: str) -> ModelFactory:
        instance = self._registry.lookup(name)
        cached = self._factories.get(name)
        if cached is not None and cached[0] is instance:
            return cached[1]
        with self._lock:
            cached = self._factories.get(name)
            if cached is not None and cached[0] is instance:
                return cached[1]
            from dynaconnd import schema
            from magenta_dynaconn._models import ModelFactory

            engine = instance.engine
            scope = instance.spec.reflection

            def describe(table: str) -> dict[str, Any]:
                return schema.reflect_tables(engine, scope, [table])[table]

            def list_tables() -> list[str]:
                return schema.list_tables(engine, scope)

            factory = ModelFactory(name, describe, list_tables)
            self._factories[name] = (instance, factory)
            return factory

    def _after_fork(self) -> None:
        for instance in self._registry.snapshot.instances.values():
            instance.engine.dispose(close=False)
