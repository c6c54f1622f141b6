"""Field cases about engines, against the real MariaDB server.

C7: a server that closes idle connections; C8: a user name and a
password full of URL characters, checked by a server that really
verifies passwords (the shared PostgreSQL trusts every local login).
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa

from magenta_dynaconn import DatabaseRegistry
from tests.conftest import MYSQL_ADMIN, ini_section

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from sqlalchemy.engine import URL

C8_PASSWORD = "p@ss:w/rd#1%7d+x"
#: Seconds of idleness after which the server drops a connection.
IDLE_LIMIT = 2


@pytest.fixture
def url_user(mysql_url: URL) -> Iterator[URL]:
    """Create a MariaDB user named with an '@' and a C8 password."""
    user = f"app@{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(MYSQL_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(
            sa.text("CREATE USER :user@'%' IDENTIFIED BY :password"),
            {"user": user, "password": C8_PASSWORD},
        )
        connection.execute(
            sa.text(f"GRANT ALL ON `{mysql_url.database}`.* TO :user@'%'"),
            {"user": user},
        )
    try:
        yield mysql_url.set(username=user, password=C8_PASSWORD)
    finally:
        with admin.connect() as connection:
            connection.execute(
                sa.text("DROP USER IF EXISTS :user@'%'"), {"user": user}
            )
        admin.dispose()


def test_url_characters_in_user_and_password_connect(
    tmp_path: Path, url_user: URL
) -> None:
    """A user with '@' and a password with ':/#%+' log in (C8)."""
    ini = tmp_path / "source.ini"
    ini.write_text(ini_section("crm", url_user))

    with DatabaseRegistry(ini) as registry:
        with registry.session_scope("crm") as session:
            who = session.execute(sa.text("SELECT CURRENT_USER()")).scalar()
        described = repr(registry.describe("crm"))

    assert f"{url_user.username}@%" == who
    assert C8_PASSWORD not in described


def test_wrong_password_is_refused_without_echoing_it(
    tmp_path: Path, url_user: URL
) -> None:
    """A wrong password fails to log in, and the error hides it."""
    wrong = "Wr0ng:p@ss/word"
    ini = tmp_path / "source.ini"
    ini.write_text(ini_section("crm", url_user.set(password=wrong)))

    with DatabaseRegistry(ini) as registry:
        result = registry.ping("crm")

    assert result["ok"] is False
    assert "Access denied" in result["error"]
    assert wrong not in repr(result)


@pytest.fixture
def idle_limited(tmp_path: Path, mysql_url: URL) -> Iterator[DatabaseRegistry]:
    """Yield a registry whose MariaDB sessions die after IDLE_LIMIT s."""
    ini = tmp_path / "source.ini"
    ini.write_text(
        ini_section("crm", mysql_url)
        + f"query.init_command = SET SESSION wait_timeout={IDLE_LIMIT}\n"
    )
    with DatabaseRegistry(ini) as registry:
        yield registry


def test_session_opened_after_the_idle_limit_works(
    idle_limited: DatabaseRegistry,
) -> None:
    """A pooled connection the server closed is replaced unnoticed (C7)."""
    with idle_limited.session_scope("crm") as session:
        session.execute(sa.text("SELECT 1"))

    time.sleep(IDLE_LIMIT + 1.5)

    with idle_limited.session_scope("crm") as session:
        assert 1 == session.execute(sa.text("SELECT 1")).scalar()
    assert idle_limited.ping("crm")["ok"] is True


def test_session_held_across_the_idle_limit_fails_once(
    idle_limited: DatabaseRegistry,
) -> None:
    """A session idle past the limit gets one error; the next one works."""
    session = idle_limited.new_session("crm")
    session.execute(sa.text("SELECT 1"))

    time.sleep(IDLE_LIMIT + 1.5)

    with pytest.raises(
        sa.exc.OperationalError, match=r"gone away|Lost connection"
    ):
        session.execute(sa.text("SELECT 1"))
    session.rollback()
    session.close()
    with idle_limited.session_scope("crm") as fresh:
        assert 1 == fresh.execute(sa.text("SELECT 1")).scalar()
