"""Tests for dynaconnd.genfile: the memory-mapped generation counter."""

from __future__ import annotations

import os
import stat
import struct
import threading
import timeit
from typing import TYPE_CHECKING

import pytest

from dynaconnd.genfile import (
    GENFILE_MODE,
    TORN,
    GenerationReader,
    GenerationWriter,
    generation_path,
)
from tests.helpers import wait_for

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


@pytest.fixture
def path(tmp_path: Path) -> str:
    """Return where the generation file of a test socket lives."""
    return generation_path(str(tmp_path / "dynaconnd.sock"))


@pytest.fixture
def writer(path: str) -> Iterator[GenerationWriter]:
    """Yield a writer; close it afterwards."""
    writer = GenerationWriter(path)
    yield writer
    writer.close()


def test_generation_path_is_beside_the_socket() -> None:
    """The file is named after the socket."""
    assert "/run/x/dynaconnd.sock.gen" == generation_path(
        "/run/x/dynaconnd.sock"
    )


def test_reader_sees_each_published_generation(
    path: str, writer: GenerationWriter
) -> None:
    """A publish is visible to the next read, with no reopening."""
    reader = GenerationReader(path)

    assert 0 == reader.read()
    for generation in (1, 2, 7, 2**40):
        writer.publish(generation)
        assert generation == reader.read()
        assert (writer.instance, generation) == reader.read_stamp()


def test_reader_returns_none_when_the_file_is_missing(path: str) -> None:
    """No file, no daemon: the reader says so instead of raising."""
    reader = GenerationReader(path)

    assert reader.read() is None
    assert reader.peek() is None


def test_closed_writer_reads_as_none_and_removes_its_file(
    path: str,
) -> None:
    """A reader still mapping a stopped daemon's file gets None."""
    writer = GenerationWriter(path)
    writer.publish(3)
    reader = GenerationReader(path)
    assert 3 == reader.read()

    writer.close()

    assert reader.read() is None
    assert not os.path.exists(path)


def test_reader_follows_a_restarted_writer(path: str) -> None:
    """A new writer is a new inode and a new instance: readers notice."""
    first = GenerationWriter(path)
    first.publish(5)
    reader = GenerationReader(path, recheck_interval=0.01)
    assert (first.instance, 5) == reader.read_stamp()

    # A crash: the old file is never closed, a new one replaces it.
    second = GenerationWriter(path)
    try:
        second.publish(5)
        assert first.instance != second.instance
        wait_for(
            lambda: reader.read_stamp() == (second.instance, 5),
            what="the reader maps the new file",
        )
    finally:
        second.close()
        first.close()


def test_closing_an_old_writer_leaves_the_new_file(path: str) -> None:
    """A stale writer's close never removes a newer daemon's file."""
    old = GenerationWriter(path)
    new = GenerationWriter(path)
    new.publish(9)

    old.close()

    assert 9 == GenerationReader(path).read()
    new.close()


def test_file_mode_and_group(path: str) -> None:
    """The file gets the requested mode and group."""
    writer = GenerationWriter(path, mode=0o640, gid=os.getgid())
    try:
        assert 0o640 == stat.S_IMODE(os.stat(path).st_mode)
    finally:
        writer.close()
    default = GenerationWriter(path)
    try:
        assert GENFILE_MODE == stat.S_IMODE(os.stat(path).st_mode)
    finally:
        default.close()


def test_negative_generation_is_refused(writer: GenerationWriter) -> None:
    """Generations count up from zero."""
    with pytest.raises(ValueError, match="generation must be >= 0"):
        writer.publish(-1)


def test_publish_after_close_is_refused(path: str) -> None:
    """A closed writer cannot publish."""
    writer = GenerationWriter(path)
    writer.close()

    with pytest.raises(ValueError, match="is closed"):
        writer.publish(1)


def test_decode_rejects_a_torn_read(
    path: str, writer: GenerationWriter
) -> None:
    """Bytes from the middle of a write are TORN, never a value."""
    writer.publish(4)
    raw = GenerationReader(path).peek()
    assert raw is not None
    fields = list(struct.unpack("<6Q", raw))

    # The first sequence copy already new, the second still old.
    begun = struct.pack("<6Q", fields[0] + 1, *fields[1:])
    # Sequence copies agree but the generation is from another write.
    mixed = struct.pack("<6Q", *fields[:2], fields[2] + 1, *fields[3:])

    assert TORN is GenerationReader.decode(begun)
    assert TORN is GenerationReader.decode(mixed)
    assert (writer.instance, 4) == GenerationReader.decode(raw)


def test_reads_under_concurrent_writes_are_never_torn(
    path: str, writer: GenerationWriter
) -> None:
    """A reader racing a busy writer sees only published values."""
    reader = GenerationReader(path)
    stop = threading.Event()

    def write() -> None:
        generation = 0
        while not stop.is_set():
            generation += 1
            writer.publish(generation)

    thread = threading.Thread(target=write, name="dynaconn-test-writer")
    thread.start()
    try:
        seen = []
        for _ in range(20_000):
            stamp = reader.read_stamp()
            assert stamp is not None
            assert writer.instance == stamp[0]
            seen.append(stamp[1])
    finally:
        stop.set()
        thread.join()
    assert seen == sorted(seen)


def test_reading_costs_about_a_microsecond(
    path: str, writer: GenerationWriter
) -> None:
    """peek() and read() stay cheap enough for every new session."""
    reader = GenerationReader(path)
    writer.publish(1)
    reader.read()
    number = 20_000

    peek = min(timeit.repeat(reader.peek, number=number, repeat=5)) / number
    read = min(timeit.repeat(reader.read, number=number, repeat=5)) / number

    print(f"peek {peek * 1e9:.0f} ns, read {read * 1e9:.0f} ns")
    # Generous bounds: a loaded CI machine is slow, a syscall is not.
    assert peek < 2e-6
    assert read < 10e-6
