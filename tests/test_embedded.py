"""The embedded DatabaseRegistry: the API apps already know."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa
from structlog.testing import capture_logs

from magenta_dynaconn import (
    ConfigError,
    DatabaseRegistry,
    UnknownDatabaseError,
    UnknownTableError,
)
from tests.conftest import ini_section
from tests.helpers import wait_for

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from sqlalchemy.engine import URL

QUICKSTART = """\
from magenta_dynaconn import DatabaseRegistry
registry = DatabaseRegistry()
print(registry.list_names())
session = registry.new_session("my_db")
Product = registry.get_db_instance("my_db", "product")
p = Product(name="Demo", description="Test")
session.add(p)
session.commit()
"""

PRODUCT_DDL = (
    "CREATE TABLE product (id INTEGER PRIMARY KEY,"
    " name VARCHAR(50), description VARCHAR(200))"
)


def make_product_table(url: URL) -> None:
    """Create the quickstart's product table in the database at ``url``."""
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.execute(sa.text(PRODUCT_DDL))
    engine.dispose()


@pytest.fixture
def registry(tmp_path: Path, db_url: URL) -> Iterator[DatabaseRegistry]:
    """Yield an embedded registry with one database, ``main``."""
    make_product_table(db_url)
    ini = tmp_path / "source.ini"
    ini.write_text(ini_section("main", db_url))
    reg = DatabaseRegistry(ini)
    yield reg
    reg.close()


def test_quickstart_runs_verbatim(tmp_path: Path) -> None:
    """The README's quickstart works in a folder with a SQLite source.ini."""
    (tmp_path / "source.ini").write_text(
        "[my_db]\nsource = sqlite\nbase = ./shop.db\n"
    )
    make_product_table(
        sa.engine.URL.create("sqlite", database=str(tmp_path / "shop.db"))
    )

    result = subprocess.run(
        [sys.executable, "-c", QUICKSTART],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )

    assert 0 == result.returncode, result.stderr
    assert "['my_db']" == result.stdout.strip().splitlines()[-1]
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'shop.db'}")
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text("SELECT name, description FROM product")
        ).all()
    engine.dispose()
    assert [("Demo", "Test")] == [tuple(row) for row in rows]


def test_crud_helpers_round_trip(registry: DatabaseRegistry) -> None:
    """create, read_one, update, delete and get work on every backend."""
    Product = registry.get_db_instance("main", "product")

    with registry.session_scope("main") as session:
        created = Product.create(
            session, id=1, name="Demo", description="Test"
        )
        assert 1 == created.id
    with registry.session_scope("main") as session:
        assert "Demo" == Product.read_one(session, id=1).name
        assert 1 == Product.update(session, {"id": 1}, {"name": "Renamed"})
    with registry.session_scope("main") as session:
        assert "Renamed" == Product.get(session, 1).name
        assert 1 == len(Product.read_all(session))
        assert 1 == Product.delete(session, id=1)
    with registry.session_scope("main") as session:
        assert [] == Product.read_all(session)


def test_session_scope_rolls_back_on_error(registry: DatabaseRegistry) -> None:
    """An exception inside session_scope rolls the work back."""
    Product = registry.get_db_instance("main", "product")

    def fail_inside_scope() -> None:
        with registry.session_scope("main") as session:
            Product.create(session, id=7, name="Lost", description="x")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        fail_inside_scope()

    with registry.session_scope("main") as session:
        assert Product.read_one(session, id=7) is None


def test_model_class_is_cached_per_database(
    registry: DatabaseRegistry,
) -> None:
    """Asking twice for a table gives the very same class."""
    first = registry.get_db_instance("main", "product")

    assert first is registry.get_db_instance("main", "product")


def test_two_databases_with_the_same_table_never_collide(
    tmp_path: Path, sqlite_url: URL, pg_url: URL
) -> None:
    """Two databases with a product table get separate classes."""
    make_product_table(sqlite_url)
    make_product_table(pg_url)
    ini = tmp_path / "source.ini"
    ini.write_text(ini_section("a", sqlite_url) + ini_section("b", pg_url))

    with DatabaseRegistry(ini) as registry:
        a = registry.get_db_instance("a", "product")
        b = registry.get_db_instance("b", "product")
        with registry.session_scope("a") as session:
            a.create(session, id=1, name="in a", description="")
        with registry.session_scope("b") as session:
            assert [] == b.read_all(session)

    assert a is not b
    assert a.__table__ is not b.__table__


def test_unknown_database_names_close_matches(
    registry: DatabaseRegistry,
) -> None:
    """An unknown name raises an error that suggests the near one."""
    with pytest.raises(UnknownDatabaseError, match="did you mean main"):
        registry.new_session("mian")


def test_unknown_table_names_database_and_close_matches(
    registry: DatabaseRegistry,
) -> None:
    """An unknown table raises an error naming database and suggestions."""
    with pytest.raises(UnknownTableError) as raised:
        registry.get_db_instance("main", "prodcut")

    assert "main" in str(raised.value)
    assert "product" in str(raised.value)


def test_ping_reports_a_live_database(registry: DatabaseRegistry) -> None:
    """ping() connects now and reports success and latency."""
    result = registry.ping("main")

    assert result["ok"] is True
    assert result["latency_ms"] >= 0


def test_add_update_remove_instance_rewrite_source_ini(
    tmp_path: Path, sqlite_url: URL
) -> None:
    """The write calls validate, rewrite source.ini and apply it."""
    ini = tmp_path / "source.ini"
    ini.write_text("; my databases\n" + ini_section("main", sqlite_url))
    os.chmod(ini, 0o640)
    other = str(tmp_path / "other.db")

    with DatabaseRegistry(ini) as registry:
        added = registry.add_instance(
            "other", {"source": "sqlite", "base": other}
        )
        assert ("other",) == added.added
        assert ["main", "other"] == registry.list_names()

        changed = registry.update_instance("other", {"pool_size": 2})
        assert ("other",) == changed.changed

        with pytest.raises(ConfigError):
            registry.update_instance("other", {"port": "70000"})
        assert ["main", "other"] == registry.list_names()

        removed = registry.remove_instance("other")
        assert ("other",) == removed.removed

    text = ini.read_text()
    assert text.startswith("; my databases\n")
    assert "[other]" not in text
    assert 0o640 == os.stat(ini).st_mode & 0o777


def test_reload_keeps_previous_registry_when_ini_is_invalid(
    tmp_path: Path, sqlite_url: URL
) -> None:
    """A broken save keeps the old databases serving."""
    ini = tmp_path / "source.ini"
    ini.write_text(ini_section("main", sqlite_url))

    with DatabaseRegistry(ini) as registry:
        ini.write_text("[main\nsource = sqlite\n")
        outcome = registry.reload()
        with registry.session_scope("main") as session:
            session.execute(sa.text("SELECT 1"))
        names = registry.list_names()

    assert not outcome.applied
    assert ["main"] == names


def test_planted_password_appears_nowhere_but_source_ini(
    tmp_path: Path, pg_url: URL
) -> None:
    """A password is absent from logs, reprs, errors and written files."""
    planted = "Plant3d-S3cret%x"
    admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    role = f"r_{os.getpid()}"
    with admin.connect() as connection:
        connection.execute(sa.text(f"DROP ROLE IF EXISTS {role}"))
        connection.execute(
            sa.text(f"CREATE ROLE {role} LOGIN PASSWORD '{planted}'")
        )
    ini = tmp_path / "source.ini"
    section = ini_section("crm", pg_url.set(username=role, password=planted))
    ini.write_text(section)
    seen: list[str] = []
    try:
        with capture_logs() as events, DatabaseRegistry(ini) as registry:
            seen.append(repr(registry))
            seen.append(repr(registry.describe("crm")))
            seen.append(repr(registry.ping("crm")))
            seen.append(repr(registry.new_session("crm").get_bind()))
            ini.write_text(section + "port = 99999\n")
            seen.append(repr(registry.reload().as_dict()))
            ini.write_text(section.replace("127.0.0.1", "127.0.0.2"))
            seen.append(repr(registry.reload().as_dict()))
            try:
                registry.add_instance(
                    "x",
                    {
                        "source": "postgresql",
                        "password": planted,
                        "port": "bad",
                    },
                )
            except ConfigError as error:
                seen.append(str(error))
            seen.append(repr(events))
    finally:
        with admin.connect() as connection:
            connection.execute(sa.text(f"DROP ROLE IF EXISTS {role}"))
        admin.dispose()

    files = [
        path.read_text(errors="replace")
        for path in tmp_path.rglob("*")
        if path.is_file() and path.name != "source.ini"
    ]
    assert [] == [text for text in seen + files if planted in text]
    assert planted in ini.read_text()


def test_missing_config_file_raises_a_clear_error(tmp_path: Path) -> None:
    """Constructing a registry on a missing file names the file."""
    with pytest.raises(ConfigError, match=r"source\.ini"):
        DatabaseRegistry(tmp_path / "source.ini")


def test_session_after_fork_uses_fresh_connections(
    tmp_path: Path, pg_url: URL
) -> None:
    """A forked child gets its own connections; the parent's keep working."""
    ini = tmp_path / "source.ini"
    ini.write_text(ini_section("crm", pg_url))
    script = textwrap.dedent(
        f"""
        import os, sqlalchemy as sa
        from magenta_dynaconn import DatabaseRegistry
        reg = DatabaseRegistry({str(ini)!r})
        q = sa.text("SELECT pg_backend_pid()")
        with reg.session_scope("crm") as s:
            parent_pid = s.execute(q).scalar()
        child = os.fork()
        if child == 0:
            with reg.session_scope("crm") as s:
                pid = s.execute(q).scalar()
            os._exit(0 if pid != parent_pid else 3)
        _, status = os.waitpid(child, 0)
        with reg.session_scope("crm") as s:
            again = s.execute(q).scalar()
        print(os.waitstatus_to_exitcode(status), again == parent_pid)
        """
    )

    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )

    assert "0 True" == result.stdout.strip().splitlines()[-1], result.stderr


def test_health_reports_what_ping_found(registry: DatabaseRegistry) -> None:
    """Without monitoring, health() holds the results of ping()."""
    before = registry.health()["main"]["state"]

    registry.ping("main")
    after = registry.health()["main"]

    assert "unknown" == before
    assert "up" == after["state"]
    assert 1 == len(after["history"])


def test_monitor_health_checks_in_the_background(
    tmp_path: Path, sqlite_url: URL
) -> None:
    """With monitor_health, databases are probed without any call."""
    make_product_table(sqlite_url)
    ini = tmp_path / "source.ini"
    ini.write_text(
        ini_section("main", sqlite_url)
        + "health_interval = 200ms\n\n[gone]\nsource = postgresql\n"
        "host = 127.0.0.1\nport = 1\nbase = x\nhealth_interval = 200ms\n"
        "health_timeout = 1s\n"
    )

    with DatabaseRegistry(ini, monitor_health=True) as registry:
        states = wait_for(
            lambda: (
                states
                if (states := _states(registry))
                == {"main": "up", "gone": "down"}
                else None
            ),
            timeout=20,
            what="main up and gone down",
        )

    assert {"main": "up", "gone": "down"} == states


def _states(registry: DatabaseRegistry) -> dict[str, str]:
    return {
        name: record["state"] for name, record in registry.health().items()
    }
