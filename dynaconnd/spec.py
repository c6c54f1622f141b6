"""The validated, typed form of one database section of source.ini."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

__all__ = ["DatabaseSpec", "EngineOptions", "ReflectionScope", "Schedule"]


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """Options handed to ``sqlalchemy.create_engine``.

    ``None`` means "the dialect's default".
    """

    pool_size: int | None = None
    max_overflow: int | None = None
    pool_recycle: float | None = None
    pool_pre_ping: bool = True
    pool_timeout: float | None = None
    connect_timeout: float | None = None
    echo: bool = False


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How often the daemon checks a database, in seconds."""

    health_interval: float = 30.0
    health_timeout: float = 5.0
    reflect_interval: float = 300.0


@dataclasses.dataclass(frozen=True)
class ReflectionScope:
    """Which schemas and tables are reflected; empty means all."""

    schemas: tuple[str, ...] = ()
    include_tables: tuple[str, ...] = ()
    exclude_tables: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class DatabaseSpec:
    """Everything needed to build an engine for one database.

    Two specs compare equal exactly when a reload may keep the engine
    built from the first one.  The password lives only inside ``url``,
    whose repr masks it.
    """

    name: str
    url: URL
    engine: EngineOptions = EngineOptions()
    schedule: Schedule = Schedule()
    reflection: ReflectionScope = ReflectionScope()
    password_file: str | None = None

    @property
    def masked_url(self) -> str:
        """Return the URL as text with every password replaced by ``***``.

        Drivers also take a password as a query parameter
        (``?password=...``, ``sslpassword``), which ``URL`` does not hide
        on its own.
        """
        url = self.url
        hidden = {key: "***" for key in url.query if "pass" in key.lower()}
        if hidden:
            url = url.update_query_dict(hidden)
        rendered = url.render_as_string(hide_password=True)
        return rendered.replace("%2A%2A%2A", "***")

    @property
    def backend(self) -> str:
        """Return the dialect name, such as ``postgresql`` or ``sqlite``."""
        return self.url.get_backend_name()

    def describe(self) -> dict[str, Any]:
        """Return a masked, plain-data description for people and logs."""
        return {
            "name": self.name,
            "url": self.masked_url,
            "backend": self.backend,
            "driver": self.url.get_driver_name(),
            "host": self.url.host,
            "port": self.url.port,
            "database": self.url.database,
            "username": self.url.username,
            "engine": dataclasses.asdict(self.engine),
            "schedule": dataclasses.asdict(self.schedule),
            "reflection": {
                key: list(value)
                for key, value in dataclasses.asdict(self.reflection).items()
            },
        }
