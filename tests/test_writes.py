"""Clients editing source.ini through a real dynaconnd: opt-in, safe."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

from dynaconnd.config import parse_config
from magenta_dynaconn import ConfigError, WritesDisabledError
from tests.daemon_harness import DaemonProcess, start_dynaconnd

if TYPE_CHECKING:
    from pathlib import Path

    from magenta_dynaconn._remote import RemoteRegistry

__all__ = ["start_dynaconnd"]

Start = Callable[..., DaemonProcess]

WRITES = ("--allow-writes",)


def section(folder: Path, name: str) -> dict[str, str]:
    """Return the data of a SQLite section called ``name``."""
    return {"source": "sqlite", "base": str(folder / f"{name}.sqlite3")}


def ini(folder: Path, *names: str) -> str:
    """Render source.ini text with one SQLite section per name."""
    return "".join(
        f"[{name}]\nsource = sqlite\nbase = {folder / name}.sqlite3\n\n"
        for name in names
    )


def test_writes_are_refused_without_allow_writes(
    tmp_path: Path, start_dynaconnd: Start
) -> None:
    """add, update and remove raise WritesDisabledError; nothing changes."""
    daemon = start_dynaconnd(ini(tmp_path, "main"))
    before = daemon.config.read_bytes()
    client = daemon.client()
    try:
        refused = []
        attempts: list[Callable[[], object]] = [
            lambda: client.add_instance("extra", section(tmp_path, "x")),
            lambda: client.update_instance("main", {"pool_size": 3}),
            lambda: client.remove_instance("main"),
        ]
        for attempt in attempts:
            with pytest.raises(WritesDisabledError) as raised:
                attempt()
            refused.append(raised.value)
        names = client.list_names()
    finally:
        client.close()

    assert before == daemon.config.read_bytes()
    assert ["main"] == names
    assert [True, True, True] == [
        isinstance(error, PermissionError) for error in refused
    ]
    assert "--allow-writes" in str(refused[0])


def test_allowed_writes_edit_the_file_and_reload_at_once(
    tmp_path: Path, start_dynaconnd: Start
) -> None:
    """With --allow-writes each edit returns its reload's outcome."""
    daemon = start_dynaconnd(ini(tmp_path, "main"), args=WRITES)
    client = daemon.client()
    try:
        added = client.add_instance("extra", section(tmp_path, "extra"))
        names_after_add = client.list_names()
        updated = client.update_instance("extra", {"pool_size": 3})
        removed = client.remove_instance("extra")
        names_after_remove = client.list_names()
    finally:
        client.close()

    assert (["extra"], [], []) == (
        added["added"],
        added["changed"],
        added["removed"],
    )
    assert ["main", "extra"] == names_after_add
    assert ["extra"] == updated["changed"]
    assert (["extra"], ["main"]) == (removed["removed"], names_after_remove)
    # Removing the last section takes the blank line before it too.
    assert ini(tmp_path, "main").rstrip() + "\n" == daemon.config.read_text()
    # The output is read in a thread: let it catch up with the last edit.
    daemon.wait_event("reload.applied", removed=["extra"])
    changes = [
        (event["added"], event["changed"], event["removed"])
        for event in daemon.events("reload.applied")
        if event["generation"] > 1
    ]
    assert [
        (["extra"], [], []),
        ([], ["extra"], []),
        ([], [], ["extra"]),
    ] == changes


def test_a_bad_write_raises_config_error_and_keeps_the_file(
    tmp_path: Path, start_dynaconnd: Start
) -> None:
    """An edit that fails validation leaves source.ini byte-identical."""
    daemon = start_dynaconnd(ini(tmp_path, "main"), args=WRITES)
    before = daemon.config.read_bytes()
    client = daemon.client()
    try:
        errors = []
        attempts: list[Callable[[], object]] = [
            lambda: client.add_instance(
                "crm", {"source": "postgresql", "port": "54x"}
            ),
            lambda: client.add_instance("main", section(tmp_path, "main")),
            lambda: client.update_instance("main", {"pool_siz": 3}),
        ]
        for attempt in attempts:
            with pytest.raises(ConfigError) as raised:
                attempt()
            errors.append(raised.value)
        generation = client.generation
    finally:
        client.close()

    assert before == daemon.config.read_bytes()
    assert 1 == generation
    assert [("crm", "port"), ("main", None), ("main", "pool_siz")] == [
        next(
            (issue.section, issue.key)
            for issue in error.issues
            if issue.key in {"port", None, "pool_siz"}
        )
        for error in errors
    ]


def test_concurrent_adds_from_two_clients_both_land(
    tmp_path: Path, start_dynaconnd: Start
) -> None:
    """Two clients adding different sections at once lose neither."""
    daemon = start_dynaconnd(ini(tmp_path, "main"), args=WRITES)
    per_client = 5
    barrier = threading.Barrier(2)
    failures: list[BaseException] = []

    def add_many(prefix: str) -> None:
        client = daemon.client()
        try:
            barrier.wait(timeout=10)
            for number in range(per_client):
                name = f"{prefix}{number}"
                client.add_instance(name, section(tmp_path, name))
        except BaseException as error:
            failures.append(error)
        finally:
            client.close()

    threads = [
        threading.Thread(target=add_many, args=(prefix,), name=f"add-{prefix}")
        for prefix in ("a", "b")
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    client = daemon.client()
    try:
        names = sorted(client.list_names())
    finally:
        client.close()
    expected = sorted(
        ["main"]
        + [f"{prefix}{n}" for prefix in "ab" for n in range(per_client)]
    )
    config = parse_config(daemon.config.read_bytes(), path=str(daemon.config))
    assert ([], expected) == (failures, names)
    assert (expected, {}) == (sorted(config.specs), dict(config.rejected))


def test_readers_never_see_a_half_written_file(
    tmp_path: Path, start_dynaconnd: Start
) -> None:
    """While sections are added, every read of source.ini parses whole."""
    daemon = start_dynaconnd(ini(tmp_path, "main"), args=WRITES)
    stop = threading.Event()
    seen: list[Any] = []

    def read_repeatedly() -> None:
        while not stop.is_set():
            data = daemon.config.read_bytes()
            try:
                config = parse_config(data, path=str(daemon.config))
            except ConfigError as error:
                seen.append(error)
            else:
                seen.append(len(config.specs) + len(config.rejected))

    reader = threading.Thread(target=read_repeatedly, name="ini-reader")
    reader.start()
    client: RemoteRegistry | None = None
    try:
        client = daemon.client()
        for number in range(8):
            name = f"extra{number}"
            client.add_instance(name, section(tmp_path, name))
    finally:
        stop.set()
        reader.join(timeout=10)
        if client is not None:
            client.close()

    errors = [item for item in seen if not isinstance(item, int)]
    assert [] == errors
    assert sorted(seen) == seen
    assert (1, 9) == (seen[0], seen[-1])
