"""A memory-mapped generation counter beside the daemon's socket.

The daemon publishes a number that rises on every registry or schema
change; a client compares it with the one it last saw before each
session, without a socket round trip.  The file is 64 bytes:

=======  =====================================================
offset   field (little-endian unsigned 64-bit unless noted)
=======  =====================================================
0        magic, 8 bytes
8        sequence, written last
16       instance: random, new for every writer (daemon start)
24       generation
32       flags (bit 0: the writer has closed)
40       checksum of sequence, instance, generation and flags
48       sequence, written first
=======  =====================================================

A reader unpacks offsets 8 to 56 in one go and accepts the values only
when both sequence copies agree and the checksum matches, so a read that
overlaps a write is retried, never torn.  The writer stores the copy at
48 first and the copy at 8 last, while a reader loads 8 first and 48
last: equal copies mean no write began or ended in between.  The
checksum covers CPUs that reorder loads.
"""

from __future__ import annotations

import contextlib
import enum
import mmap
import os
import struct
import tempfile
import threading
import time
from time import monotonic as _monotonic

__all__ = [
    "GENFILE_MODE",
    "TORN",
    "GenerationReader",
    "GenerationWriter",
    "Stamp",
    "generation_path",
]

#: The generation is no secret; the socket's folder guards who gets in.
GENFILE_MODE = 0o644

#: ``(instance, generation)``: equal stamps mean nothing changed.
Stamp = tuple[int, int]


class _Torn(enum.Enum):
    TORN = "torn"


#: What :meth:`GenerationReader.decode` returns for a read that
#: overlapped a write; read again.
TORN = _Torn.TORN

_MAGIC = b"DYNGEN\x00\x01"
_SIZE = 64
_BODY = struct.Struct("<6Q")
_BODY_OFFSET = 8  # GenerationReader.peek() spells out 8:56
_END_OFFSET = 8
_DATA = struct.Struct("<4Q")
_DATA_OFFSET = 16
_BEGIN_OFFSET = 48
_SEQ = struct.Struct("<Q")
_CLOSED = 1
_SALT = 0x2545F491
# A torn read is retried; a write takes microseconds, so a reader gives
# up only if something is badly wrong (and then reports "no value").
_READ_ATTEMPTS = 1000
_SPINS = 3


def _checksum(
    sequence: int, instance: int, generation: int, flags: int
) -> int:
    # Cheap on purpose: the two sequence copies are the guard; this
    # catches a mixture of fields from two writes, since the sequence
    # differs between any two of them.
    return sequence ^ instance ^ generation << 1 ^ flags << 29 ^ _SALT


def generation_path(socket_path: str) -> str:
    """Return where the generation file of the socket ``socket_path`` is."""
    return socket_path + ".gen"


class GenerationWriter:
    """Create the generation file at ``path`` and publish into it.

    The file is built under a temporary name and renamed into place, so
    a reader never maps a half-written file; a restarted daemon's file
    is a new inode, which readers notice.
    """

    def __init__(
        self, path: str, *, mode: int = GENFILE_MODE, gid: int | None = None
    ) -> None:
        self.path = os.path.abspath(path)
        self._lock = threading.Lock()
        # 30 bits: CPython's one-digit ints keep every read cheap.
        self._instance = int.from_bytes(os.urandom(4), "little") >> 2 | 1
        self._sequence = 0
        self._generation = 0
        initial = bytearray(_SIZE)
        initial[: len(_MAGIC)] = _MAGIC
        folder = os.path.dirname(self.path)
        fd, temp = tempfile.mkstemp(dir=folder, prefix=".", suffix=".gen")
        try:
            os.fchmod(fd, mode)
            if gid is not None:
                os.fchown(fd, -1, gid)
            os.write(fd, bytes(initial))
            self._map: mmap.mmap | None = mmap.mmap(fd, _SIZE)
            self._inode = os.fstat(fd).st_ino
            self._store(0, 0)
            os.replace(temp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise
        finally:
            os.close(fd)

    @property
    def instance(self) -> int:
        """Return the random id that tells this writer's file apart."""
        return self._instance

    def publish(self, generation: int) -> None:
        """Make ``generation`` the value readers see."""
        if generation < 0:
            raise ValueError(f"generation must be >= 0, not {generation}")
        with self._lock:
            if self._map is None:
                raise ValueError(f"generation file {self.path} is closed")
            self._store(generation, 0)

    def close(self) -> None:
        """Mark the file closed for readers still mapping it, remove it."""
        with self._lock:
            if self._map is None:
                return
            self._store(self._generation, _CLOSED)
            self._map.close()
            self._map = None

            # A newer daemon may already own the path: leave its file.
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.path).st_ino == self._inode:
                    os.unlink(self.path)

    def _store(self, generation: int, flags: int) -> None:
        assert self._map is not None
        self._sequence += 1
        sequence = self._sequence
        self._generation = generation
        check = _checksum(sequence, self._instance, generation, flags)
        _SEQ.pack_into(self._map, _BEGIN_OFFSET, sequence)
        _DATA.pack_into(
            self._map, _DATA_OFFSET, self._instance, generation, flags, check
        )
        _SEQ.pack_into(self._map, _END_OFFSET, sequence)


class GenerationReader:
    """Read the generation a daemon publishes at ``path``.

    A read is one slice of a shared mapping.  At most every
    ``recheck_interval`` seconds :meth:`peek` also checks that ``path``
    is still the file it maps, and maps the new one after a restart;
    :meth:`recheck` does that at once (a watcher thread may call it).
    Mappings are never unmapped under a concurrent reader: a replaced
    one is closed when its last user lets go of it.
    """

    def __init__(self, path: str, *, recheck_interval: float = 0.25) -> None:
        self.path = os.path.abspath(path)
        self.recheck_interval = recheck_interval
        self._map: mmap.mmap | None = None
        self._identity: tuple[int, int] | None = None
        self._recheck_at = 0.0
        self._lock = threading.Lock()
        self._closed = False

    @property
    def mapping(self) -> mmap.mmap | None:
        """Return the current mapping, without checking the path.

        Byte 8 is the low byte of the sequence, which every write
        changes: comparing it is the cheapest check there is, exact but
        for a multiple of 256 writes in between.
        """
        return self._map

    def read(self) -> int | None:
        """Return the published generation, or ``None`` if there is none."""
        stamp = self.read_stamp()
        return None if stamp is None else stamp[1]

    def read_stamp(self) -> Stamp | None:
        """Return ``(instance, generation)``, or ``None`` with no daemon.

        ``None`` means the file is missing, unreadable, or was closed by
        a daemon that stopped.
        """
        checked = self.read_checked()
        return None if checked is None else checked[1]

    def read_checked(self) -> tuple[bytes, Stamp] | None:
        """Return the raw bytes of a whole write and their stamp."""
        for attempt in range(_READ_ATTEMPTS):
            raw = self.peek()
            if raw is None:
                return None
            stamp = self.decode(raw)
            if stamp is None:
                return None
            if stamp is not TORN:
                return raw, stamp
            if attempt >= _SPINS:
                # A writer thread of this process may hold its write
                # half done while waiting for the GIL: let it finish.
                time.sleep(0)
        return None

    def peek(self) -> bytes | None:
        """Return the raw, unchecked counter bytes; ``None`` with no file.

        Equal bytes mean nothing changed.  Different bytes may be a
        write in progress; :meth:`decode` says.
        """
        if _monotonic() >= self._recheck_at:
            self.recheck()
        mapping = self._map
        return None if mapping is None else mapping[8:56]

    @staticmethod
    def decode(raw: bytes) -> Stamp | _Torn | None:
        """Return the stamp in ``raw``, ``None`` if closed, or ``TORN``."""
        end, instance, generation, flags, check, begin = _BODY.unpack(raw)
        if end != begin or check != _checksum(
            begin, instance, generation, flags
        ):
            return TORN
        if flags & _CLOSED:
            return None
        return (instance, generation)

    def close(self) -> None:
        """Let go of the file; from now on there is no value to read."""
        with self._lock:
            self._closed = True
            self._map = None
            self._identity = None

    def recheck(self) -> None:
        """Map the file at ``path`` now if it is another than the mapped."""
        with self._lock:
            self._recheck_at = _monotonic() + self.recheck_interval
            if self._closed:
                return
            try:
                status = os.stat(self.path)
            except OSError:
                self._map = None
                self._identity = None
                return
            if (status.st_dev, status.st_ino) == self._identity:
                return
            self._map, self._identity = _map_file(self.path)


def _map_file(path: str) -> tuple[mmap.mmap | None, tuple[int, int] | None]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None, None
    try:
        status = os.fstat(fd)
        if status.st_size < _SIZE:
            return None, None
        mapping = mmap.mmap(fd, _SIZE, prot=mmap.PROT_READ)
    except OSError:
        return None, None
    finally:
        os.close(fd)
    if mapping[: len(_MAGIC)] != _MAGIC:
        mapping.close()
        return None, None
    return mapping, (status.st_dev, status.st_ino)
