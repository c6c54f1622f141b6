"""A TCP proxy the tests own, to make a real server look dead.

Modes:

- ``forward``: relay bytes both ways to the upstream server;
- ``refuse``: close the listening socket, so connecting is refused;
- ``reset``: accept, then reset every connection, old and new;
- ``blackhole``: accept and never answer; open connections stall.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from types import TracebackType

    from sqlalchemy.engine import URL

__all__ = ["Mode", "TcpProxy"]

Mode = Literal["forward", "refuse", "reset", "blackhole"]

_TICK = 0.02
_CHUNK = 65536


def _reset(sock: socket.socket) -> None:
    """Close ``sock`` with a TCP reset rather than an orderly FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
    sock.close()


class TcpProxy:
    """Relay 127.0.0.1:``port`` to ``upstream``, in a switchable mode."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self._upstream = (upstream_host, upstream_port)
        self._mode: Mode = "forward"
        self._changes = threading.Condition()
        self._requested = 0
        self._applied = 0
        self._stopping = threading.Event()
        self._listener: socket.socket | None = self._listen(0)
        self.port: int = self._listener.getsockname()[1]
        self._holes: list[socket.socket] = []
        self._links: list[threading.Thread] = []
        self._acceptor = threading.Thread(
            target=self._accept_loop, name="dynaconn-proxy-accept"
        )

    def __enter__(self) -> TcpProxy:
        self._acceptor.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def mode(self) -> Mode:
        """Return the current mode."""
        return self._mode

    def url(self, url: URL) -> URL:
        """Return ``url`` pointed at this proxy."""
        return url.set(host="127.0.0.1", port=self.port)

    def set_mode(self, mode: Mode) -> None:
        """Switch to ``mode``; the listener has followed when this returns."""
        with self._changes:
            self._mode = mode
            self._requested += 1
            wanted = self._requested
            if not self._changes.wait_for(
                lambda: self._applied >= wanted, timeout=5
            ):
                raise TimeoutError(f"the proxy did not switch to {mode}")

    def close(self) -> None:
        """Stop relaying, close every socket and join every thread."""
        self._stopping.set()
        if self._acceptor.is_alive():
            self._acceptor.join()
        for link in self._links:
            link.join()
        for hole in self._holes:
            _reset(hole)
        self._holes.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def _listen(self, port: int) -> socket.socket:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(64)
        return listener

    def _apply(self, mode: Mode) -> None:
        """Make the listener and held connections match ``mode``."""
        if mode == "refuse" and self._listener is not None:
            self._listener.close()
            self._listener = None
        elif mode != "refuse" and self._listener is None:
            self._listener = self._listen(self.port)
        if mode != "blackhole":
            for hole in self._holes:
                _reset(hole)
            self._holes.clear()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            with self._changes:
                mode = self._mode
                requested = self._requested
            # Only this thread touches the listener, so closing it never
            # races with a select() on it.
            self._apply(mode)
            with self._changes:
                self._applied = requested
                self._changes.notify_all()
            self._links = [link for link in self._links if link.is_alive()]

            listener = self._listener
            if listener is None:
                self._stopping.wait(_TICK)
                continue
            ready, _, _ = select.select([listener], [], [], _TICK)
            if not ready:
                continue
            client, _ = listener.accept()
            self._handle(client, self._mode)

    def _handle(self, client: socket.socket, mode: Mode) -> None:
        if mode == "blackhole":
            self._holes.append(client)
            return
        if mode != "forward":
            _reset(client)
            return
        try:
            upstream = socket.create_connection(self._upstream, timeout=2)
        except OSError:
            _reset(client)
            return
        link = threading.Thread(
            target=self._relay,
            args=(client, upstream),
            name="dynaconn-proxy-link",
        )
        self._links.append(link)
        link.start()

    def _relay(self, client: socket.socket, upstream: socket.socket) -> None:
        peers = {client: upstream, upstream: client}
        try:
            while not self._stopping.is_set():
                mode = self._mode
                if mode in {"refuse", "reset"}:
                    return
                if mode == "blackhole":
                    # Hold whatever arrives; the peer sees a stalled host.
                    self._stopping.wait(_TICK)
                    continue
                ready, _, _ = select.select(list(peers), [], [], _TICK)
                for source in ready:
                    data = source.recv(_CHUNK)
                    if not data:
                        return
                    peers[source].sendall(data)
        except OSError:
            return
        finally:
            _reset(client)
            _reset(upstream)
