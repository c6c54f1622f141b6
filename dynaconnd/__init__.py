"""dynaconnd: the daemon that owns a machine's database connections.

The registry core (config, registry, schema) lives here too, so the
embedded client and the daemon share one implementation.
"""

from __future__ import annotations

from dynaconnd._version import __version__

__all__ = ["__version__"]
