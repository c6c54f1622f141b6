"""The registry core: snapshots, diffs, draining and reload outcomes."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa
from structlog.testing import capture_logs

from dynaconnd.config import load_config
from dynaconnd.errors import ConfigError, UnknownDatabaseError
from dynaconnd.registry import Registry
from tests.conftest import ini_section
from tests.helpers import wait_for

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from sqlalchemy.engine import URL


@pytest.fixture
def registry() -> Iterator[Registry]:
    """Yield a registry that drains quickly and is closed afterwards."""
    reg = Registry(drain_timeout=5.0)
    yield reg
    reg.close()


def sqlite_section(tmp_path: Path, name: str, **extra: str) -> str:
    """Render a section for a SQLite file named after ``name``."""
    lines = [f"[{name}]", "source = sqlite", f"base = {tmp_path / name}.db"]
    lines += [f"{key} = {value}" for key, value in extra.items()]
    return "\n".join(lines) + "\n\n"


def write(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` and return the path."""
    path.write_text(text)
    return path


def test_first_load_adds_every_section_and_starts_generation_one(
    tmp_path: Path, registry: Registry
) -> None:
    """A first load adds all valid sections at generation 1."""
    ini = write(
        tmp_path / "source.ini",
        sqlite_section(tmp_path, "a") + sqlite_section(tmp_path, "b"),
    )

    outcome = registry.apply(load_config(ini))

    assert ("a", "b") == outcome.added
    assert 1 == outcome.generation == registry.generation
    assert ["a", "b"] == registry.snapshot.names()


def test_unchanged_section_keeps_the_very_same_engine(
    tmp_path: Path, registry: Registry
) -> None:
    """Editing one section rebuilds only that section's engine (C17)."""
    ini = tmp_path / "source.ini"
    write(
        ini,
        sqlite_section(tmp_path, "crm") + sqlite_section(tmp_path, "billing"),
    )
    registry.apply(load_config(ini))
    crm_before = registry.snapshot.get("crm").engine
    billing_before = registry.snapshot.get("billing").engine

    write(
        ini,
        sqlite_section(tmp_path, "crm")
        + sqlite_section(tmp_path, "billing", pool_size="3"),
    )
    outcome = registry.apply(load_config(ini))

    assert ("billing",) == outcome.changed
    assert ("crm",) == outcome.unchanged
    assert crm_before is registry.snapshot.get("crm").engine
    assert billing_before is not registry.snapshot.get("billing").engine
    assert 2 == registry.generation


def test_saving_identical_content_does_not_raise_the_generation(
    tmp_path: Path, registry: Registry
) -> None:
    """A reload that changes nothing keeps the generation."""
    ini = write(tmp_path / "source.ini", sqlite_section(tmp_path, "a"))
    registry.apply(load_config(ini))

    outcome = registry.apply(load_config(ini))

    assert not outcome.has_changes
    assert 1 == registry.generation


def test_open_transaction_on_unchanged_database_commits_across_reload(
    tmp_path: Path, registry: Registry
) -> None:
    """A transaction open on crm survives a reload that edits billing."""
    ini = tmp_path / "source.ini"
    write(
        ini,
        sqlite_section(tmp_path, "crm") + sqlite_section(tmp_path, "billing"),
    )
    registry.apply(load_config(ini))
    engine = registry.snapshot.get("crm").engine
    with engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE t (x INTEGER)"))

    with engine.connect() as connection:
        connection.execute(sa.text("INSERT INTO t VALUES (1)"))
        write(ini, sqlite_section(tmp_path, "crm"))
        outcome = registry.apply(load_config(ini))
        connection.commit()

    assert ("billing",) == outcome.removed
    with registry.snapshot.get("crm").engine.connect() as connection:
        assert (
            1 == connection.execute(sa.text("SELECT count(*) FROM t")).scalar()
        )
    with pytest.raises(UnknownDatabaseError, match="billing"):
        registry.snapshot.get("billing")


def test_removed_engine_is_disposed_once_its_connection_returns(
    tmp_path: Path,
) -> None:
    """A removed database's engine waits for its borrowed connection."""
    registry = Registry(drain_timeout=30.0)
    ini = tmp_path / "source.ini"
    write(
        ini,
        sqlite_section(tmp_path, "crm") + sqlite_section(tmp_path, "billing"),
    )
    registry.apply(load_config(ini))
    engine = registry.snapshot.get("billing").engine
    disposed = threading.Event()
    sa.event.listen(engine.pool, "close", lambda *_: disposed.set())
    try:
        connection = engine.connect()
        connection.execute(sa.text("SELECT 1"))

        write(ini, sqlite_section(tmp_path, "crm"))
        registry.apply(load_config(ini))

        assert 1 == registry.draining
        assert not disposed.wait(0.3)
        connection.close()
        wait_for(lambda: registry.draining == 0, what="engine drained")
    finally:
        registry.close()


def test_drain_timeout_disposes_an_engine_still_in_use(
    tmp_path: Path,
) -> None:
    """An engine whose connection never returns is disposed at the deadline."""
    registry = Registry(drain_timeout=0.3)
    ini = tmp_path / "source.ini"
    write(ini, sqlite_section(tmp_path, "a"))
    registry.apply(load_config(ini))
    connection = registry.snapshot.get("a").engine.connect()
    try:
        with capture_logs() as events:
            write(ini, "")
            write(ini, sqlite_section(tmp_path, "b"))
            registry.apply(load_config(ini))
            wait_for(lambda: registry.draining == 0, what="forced dispose")
        disposed = [e for e in events if e["event"] == "engine.disposed"]
        assert [("a", True)] == [
            (e["database"], e["forced"]) for e in disposed
        ]
    finally:
        connection.close()
        registry.close()


def test_invalid_section_keeps_its_previous_definition(
    tmp_path: Path, registry: Registry
) -> None:
    """A section that fails validation keeps serving its old engine."""
    ini = tmp_path / "source.ini"
    write(ini, sqlite_section(tmp_path, "a") + sqlite_section(tmp_path, "b"))
    registry.apply(load_config(ini))
    engine_a = registry.snapshot.get("a").engine

    write(
        ini,
        sqlite_section(tmp_path, "a", pool_size="lots")
        + sqlite_section(tmp_path, "b", pool_size="2")
        + sqlite_section(tmp_path, "c", pool_size="many"),
    )
    with capture_logs() as events:
        outcome = registry.apply(load_config(ini))

    assert ("a",) == outcome.kept
    assert {"a", "c"} == set(outcome.rejected)
    assert ("b",) == outcome.changed
    assert engine_a is registry.snapshot.get("a").engine
    assert ["a", "b"] == sorted(registry.snapshot.names())
    assert ["config.rejected"] == [
        e["event"] for e in events if e["log_level"] != "debug"
    ]
    keys = {(e["section"], e["key"]) for e in events[0]["errors"]}
    assert {("a", "pool_size"), ("c", "pool_size")} == keys


def test_unusable_file_changes_nothing(
    tmp_path: Path, registry: Registry
) -> None:
    """A file with a syntax error leaves the old snapshot live."""
    ini = write(tmp_path / "source.ini", sqlite_section(tmp_path, "a"))
    registry.apply(load_config(ini))
    before = registry.snapshot

    write(ini, "[a]\nsource = sqlite\n[a]\nbase = x\n")
    with pytest.raises(ConfigError) as raised:
        load_config(ini)
    with capture_logs() as events:
        outcome = registry.reject(raised.value, path=str(ini))

    assert before is registry.snapshot
    assert not outcome.applied
    assert ["config.rejected"] == [e["event"] for e in events]
    assert events[0]["errors"][0]["line"] is not None


def test_outcome_is_plain_data(tmp_path: Path, registry: Registry) -> None:
    """The reload outcome converts to plain, JSON-friendly data."""
    import json

    ini = write(tmp_path / "source.ini", sqlite_section(tmp_path, "a"))
    outcome = registry.apply(load_config(ini))

    data = json.loads(json.dumps(outcome.as_dict()))

    assert ["a"] == data["added"]
    assert 1 == data["generation"]


def test_changed_server_section_is_proven_before_the_swap(
    tmp_path: Path, db_url: URL, registry: Registry
) -> None:
    """A changed section's new engine has connected once before use."""
    ini = tmp_path / "source.ini"
    write(ini, ini_section("main", db_url))
    registry.apply(load_config(ini))

    write(ini, ini_section("main", db_url) + "pool_size = 2\n")
    outcome = registry.apply(load_config(ini))

    # A SQLite file has no credentials to prove, and is left untouched.
    proven = 0 if db_url.get_backend_name() == "sqlite" else 1
    assert ("main",) == outcome.changed
    assert {} == dict(outcome.unreachable)
    pool = registry.snapshot.get("main").engine.pool
    assert proven == pool.checkedin()


def test_changed_section_that_cannot_connect_is_applied_and_says_so(
    tmp_path: Path, registry: Registry
) -> None:
    """A new engine that cannot connect is still applied, with a reason."""
    ini = tmp_path / "source.ini"
    section = (
        "[pg]\nsource = postgresql\nusername = nobody\npassword = Plant3dPw\n"
        "host = 127.0.0.1\nport = {port}\nbase = x\nconnect_timeout = 1\n"
    )
    write(ini, section.format(port=1))
    registry.apply(load_config(ini))

    write(ini, section.format(port=2))
    with capture_logs() as events:
        outcome = registry.apply(load_config(ini))

    assert ("pg",) == outcome.changed
    assert "pg" in outcome.unreachable
    assert "Plant3dPw" not in repr(events)
    assert "Plant3dPw" not in repr(outcome.as_dict())
