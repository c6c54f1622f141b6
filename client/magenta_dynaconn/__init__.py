"""magenta_dynaconn: the registry of a machine's databases, for apps.

``DatabaseRegistry()`` reads ``source.ini`` in this process;
``DatabaseRegistry.connect()`` draws on a running ``dynaconnd``.
"""

from __future__ import annotations

from dynaconnd._version import __version__
from dynaconnd.errors import (
    ConfigError,
    ConfigIssue,
    DynaconnError,
    MissingDriverError,
    NoPrimaryKeyError,
    ProtocolMismatchError,
    RegistryUnavailableError,
    UnknownDatabaseError,
    UnknownTableError,
    WritesDisabledError,
)
from dynaconnd.logs import quiet_library_defaults
from magenta_dynaconn._embedded import DatabaseRegistry

quiet_library_defaults()

__all__ = [
    "ConfigError",
    "ConfigIssue",
    "DatabaseRegistry",
    "DynaconnError",
    "MissingDriverError",
    "NoPrimaryKeyError",
    "ProtocolMismatchError",
    "RegistryUnavailableError",
    "UnknownDatabaseError",
    "UnknownTableError",
    "WritesDisabledError",
    "__version__",
]
