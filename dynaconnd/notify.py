"""The systemd notification protocol: datagrams to ``$NOTIFY_SOCKET``.

The protocol is a few ``KEY=value`` lines in one datagram.  The Python
bindings (python-systemd) need libsystemd headers to build and the
small pure-Python packages are unmaintained, so this module speaks it
directly.
"""

from __future__ import annotations

import os
import socket
import time

from dynaconnd.logs import get_logger

__all__ = ["Notifier"]

log = get_logger("notify")


class Notifier:
    """Send state changes to systemd; does nothing outside a notify unit."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        # A leading "@" names a socket in the abstract namespace.
        if address.startswith("@"):
            address = "\0" + address[1:]
        self._address = address or None
        self._socket: socket.socket | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        watchdog_for_us = not pid or pid == str(os.getpid())
        self.watchdog_interval = (
            int(usec) / 2e6 if usec.isdigit() and watchdog_for_us else None
        )

    @property
    def enabled(self) -> bool:
        """Return whether systemd asked to be notified."""
        return self._address is not None

    def send(self, *fields: str) -> None:
        """Send ``fields`` (``KEY=value`` strings) in one datagram."""
        if self._address is None:
            return
        if self._socket is None:
            self._socket = socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
            )
        try:
            self._socket.sendto("\n".join(fields).encode(), self._address)
        except OSError as error:
            log.warning("notify.failed", error_class=error.__class__.__name__)

    def ready(self, status: str | None = None) -> None:
        """Tell systemd the service is up."""
        self.send("READY=1", *self._status(status))

    def reloading(self) -> None:
        """Tell systemd a reload started (type notify-reload style)."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        """Tell systemd the service is shutting down."""
        self.send("STOPPING=1")

    def status(self, status: str) -> None:
        """Set the one-line status shown by ``systemctl status``."""
        self.send(f"STATUS={status}")

    def watchdog(self) -> None:
        """Tell systemd's watchdog the service is alive."""
        self.send("WATCHDOG=1")

    def close(self) -> None:
        """Close the datagram socket."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    @staticmethod
    def _status(status: str | None) -> list[str]:
        return [f"STATUS={status}"] if status else []
