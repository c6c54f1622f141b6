"""The version of magenta-dynaconn, shared by the daemon and the client."""

from __future__ import annotations

__version__ = "0.1.0"
