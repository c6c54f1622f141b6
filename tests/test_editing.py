"""Specifications for dynaconnd.editing: changing source.ini in place."""

from __future__ import annotations

import codecs
import os
import stat
from typing import TYPE_CHECKING

import pytest

from dynaconnd.config import load_config
from dynaconnd.editing import (
    add_section,
    remove_section,
    render_section,
    update_section,
)
from dynaconnd.errors import ConfigError, UnknownDatabaseError

if TYPE_CHECKING:
    from pathlib import Path

PLANTED = "Pl4nted-S3cret!xyz"

ORIGINAL = """\
# Databases of this host.

# The main store.
[main]
source = sqlite
base = main.db
; keep this comment

# CRM, on the shared server.
[crm]
source = postgresql
# the service account
username = app_user
host = db
port = 5432

[billing]
source = sqlite
base = billing.db
"""


@pytest.fixture
def ini(tmp_path: Path) -> Path:
    """Write the ORIGINAL source.ini with mode 0640 and return its path."""
    path = tmp_path / "source.ini"
    path.write_text(ORIGINAL)
    path.chmod(0o640)
    return path


def mode_of(path: Path) -> int:
    """Return the permission bits of ``path``."""
    return stat.S_IMODE(path.stat().st_mode)


# -- render_section -----------------------------------------------------------


def test_render_section_writes_one_key_per_line() -> None:
    """Keys come out lower-case in the order given; None is left out."""
    assert "[crm]\nsource = postgresql\nport = 5432\nusername =\n" == (
        render_section(
            "crm",
            {
                "Source": "postgresql",
                "port": 5432,
                "host": None,
                "username": "",
            },
        )
    )


def test_render_section_refuses_values_that_cannot_be_read_back() -> None:
    """A line break or edge spaces are refused without echoing the value."""
    with pytest.raises(ConfigError) as caught:
        render_section(
            "crm", {"password": f"{PLANTED}\n[evil]", "host": " db "}
        )

    assert [("password", None), ("host", None)] == [
        (issue.key, issue.line) for issue in caught.value.issues
    ]
    assert PLANTED not in str(caught.value)


@pytest.mark.parametrize("name", ["DEFAULT", "", " crm", "a\nb"])
def test_render_section_refuses_bad_section_names(name: str) -> None:
    """DEFAULT, blank, padded or multi-line names are refused."""
    with pytest.raises(ConfigError):
        render_section(name, {"source": "sqlite"})


# -- add_section --------------------------------------------------------------


def test_add_section_appends_and_keeps_everything_else(ini: Path) -> None:
    """A new section goes at the end; the rest of the file is untouched."""
    add_section(ini, "new", {"source": "sqlite", "base": "new.db"})

    assert ORIGINAL + "\n[new]\nsource = sqlite\nbase = new.db\n" == (
        ini.read_text()
    )
    assert 0o640 == mode_of(ini)
    assert ["main", "crm", "billing", "new"] == list(load_config(ini).specs)


def test_add_section_keeps_special_characters_in_passwords(
    ini: Path,
) -> None:
    """``%``, ``;``, ``#`` and URL characters are written verbatim."""
    password = "50%off%(x)s;p@ss:w/rd#1%7d+x"
    add_section(
        ini,
        "pg",
        {"source": "postgresql", "host": "db", "password": password},
    )

    assert password == load_config(ini).specs["pg"].url.password


def test_add_section_refuses_an_existing_name(ini: Path) -> None:
    """Adding [crm] again fails, naming its line, and changes nothing."""
    before = ini.read_bytes()

    with pytest.raises(ConfigError) as caught:
        add_section(ini, "crm", {"source": "sqlite", "base": "x.db"})

    assert [("crm", 10)] == [
        (issue.section, issue.line) for issue in caught.value.issues
    ]
    assert before == ini.read_bytes()


def test_add_section_with_overwrite_replaces_it_in_place(ini: Path) -> None:
    """overwrite=True swaps the section's lines, keeping its comment."""
    add_section(
        ini, "crm", {"source": "sqlite", "base": "crm.db"}, overwrite=True
    )

    text = ini.read_text()
    assert "# CRM, on the shared server.\n[crm]\nsource = sqlite\n" in text
    assert "app_user" not in text
    assert text.endswith("[billing]\nsource = sqlite\nbase = billing.db\n")


def test_invalid_data_leaves_the_file_byte_identical(ini: Path) -> None:
    """Validation runs first: a bad port writes nothing."""
    before = ini.read_bytes()

    with pytest.raises(ConfigError) as caught:
        add_section(
            ini,
            "pg",
            {"source": "postgresql", "port": "5432 ; x", "password": PLANTED},
        )

    assert ["port"] == [issue.key for issue in caught.value.issues]
    assert PLANTED not in str(caught.value)
    assert before == ini.read_bytes()


def test_add_section_creates_a_missing_file_privately(tmp_path: Path) -> None:
    """A missing source.ini is created with mode 0600."""
    path = tmp_path / "source.ini"

    add_section(path, "main", {"source": "sqlite", "base": "m.db"})

    assert "[main]\nsource = sqlite\nbase = m.db\n" == path.read_text()
    assert 0o600 == mode_of(path)


def test_add_section_refuses_to_edit_a_broken_file(tmp_path: Path) -> None:
    """A file with duplicate keys is reported, not rewritten."""
    path = tmp_path / "source.ini"
    path.write_text("[a]\nbase = x\nBase = y\n")

    with pytest.raises(ConfigError):
        add_section(path, "b", {"source": "sqlite", "base": "b.db"})

    assert "[a]\nbase = x\nBase = y\n" == path.read_text()


def test_editing_keeps_crlf_endings_and_the_bom(tmp_path: Path) -> None:
    """A Windows-saved file stays CRLF and keeps its byte order mark."""
    path = tmp_path / "source.ini"
    path.write_bytes(
        codecs.BOM_UTF8 + b"[main]\r\nsource = sqlite\r\nbase = m.db\r\n"
    )

    add_section(path, "b", {"source": "sqlite", "base": "b.db"})

    assert (
        codecs.BOM_UTF8 + b"[main]\r\nsource = sqlite\r\nbase = m.db\r\n"
        b"\r\n[b]\r\nsource = sqlite\r\nbase = b.db\r\n"
    ) == path.read_bytes()


def test_editing_through_a_symlink_keeps_the_link(tmp_path: Path) -> None:
    """The file a symlink points at is replaced; the link stays a link."""
    real = tmp_path / "real.ini"
    real.write_text("[main]\nsource = sqlite\nbase = m.db\n")
    link = tmp_path / "source.ini"
    link.symlink_to(real)

    add_section(link, "b", {"source": "sqlite", "base": "b.db"})

    assert link.is_symlink()
    assert "[b]" in real.read_text()


# -- update_section -----------------------------------------------------------


def test_update_section_changes_keys_on_their_own_lines(ini: Path) -> None:
    """Changed keys keep their place; comments around them stay."""
    update_section(ini, "crm", {"host": "db2", "PORT": 6543})

    assert ORIGINAL.replace(
        "host = db\nport = 5432", "host = db2\nport = 6543"
    ) == (ini.read_text())
    assert 0o640 == mode_of(ini)


def test_update_section_removes_keys_given_none(ini: Path) -> None:
    """A value of None removes the key's line."""
    update_section(ini, "crm", {"username": None, "port": None})

    assert (
        ORIGINAL.replace("username = app_user\n", "").replace(
            "port = 5432\n", ""
        )
        == ini.read_text()
    )


def test_update_section_adds_new_keys_after_the_last_key(ini: Path) -> None:
    """New keys follow the section's last key, before trailing comments."""
    update_section(ini, "main", {"echo": "yes", "pool_size": 3})

    assert (
        ORIGINAL.replace(
            "base = main.db\n",
            "base = main.db\necho = yes\npool_size = 3\n",
        )
        == ini.read_text()
    )


def test_update_section_validates_the_merged_section(ini: Path) -> None:
    """Merging a host into a sqlite section is refused; nothing changes."""
    before = ini.read_bytes()

    with pytest.raises(ConfigError) as caught:
        update_section(ini, "main", {"host": "db"})

    assert [("main", "host")] == [
        (issue.section, issue.key) for issue in caught.value.issues
    ]
    assert before == ini.read_bytes()


def test_update_section_of_an_unknown_name_is_unknown_database(
    ini: Path,
) -> None:
    """Updating a section that is not there raises UnknownDatabaseError."""
    with pytest.raises(UnknownDatabaseError, match=r"\[nope\]"):
        update_section(ini, "nope", {"host": "x"})


def test_update_that_changes_nothing_does_not_rewrite(ini: Path) -> None:
    """Writing the same value leaves the very same file (same inode)."""
    before = os.stat(ini).st_ino

    update_section(ini, "crm", {"host": "db"})

    assert before == os.stat(ini).st_ino


# -- remove_section -----------------------------------------------------------


def test_remove_section_drops_it_and_its_comment(ini: Path) -> None:
    """The section and the comment just above it go; the rest stays."""
    remove_section(ini, "crm")

    assert (
        ORIGINAL.replace(
            "# CRM, on the shared server.\n[crm]\nsource = postgresql\n"
            "# the service account\nusername = app_user\nhost = db\n"
            "port = 5432\n\n",
            "",
        )
        == ini.read_text()
    )
    assert 0o640 == mode_of(ini)


def test_remove_first_section_keeps_the_file_header(ini: Path) -> None:
    """A header comment separated by a blank line is not the section's."""
    remove_section(ini, "main")

    assert (
        ORIGINAL.replace(
            "# The main store.\n[main]\nsource = sqlite\nbase = main.db\n"
            "; keep this comment\n\n",
            "",
        )
        == ini.read_text()
    )


def test_remove_last_section_leaves_a_clean_end(ini: Path) -> None:
    """Removing the last section leaves the file ending as before it."""
    remove_section(ini, "billing")

    assert (
        ORIGINAL.removesuffix(
            "\n[billing]\nsource = sqlite\nbase = billing.db\n"
        )
        == ini.read_text()
    )


def test_remove_unknown_section_is_unknown_database(ini: Path) -> None:
    """Removing a section that is not there raises a KeyError subclass."""
    before = ini.read_bytes()

    with pytest.raises(KeyError):
        remove_section(ini, "nope")

    assert before == ini.read_bytes()


def test_remove_the_only_section_is_refused(tmp_path: Path) -> None:
    """An edit never leaves source.ini without a database section."""
    path = tmp_path / "source.ini"
    path.write_text("[main]\nsource = sqlite\nbase = m.db\n")

    with pytest.raises(ConfigError, match="only database section"):
        remove_section(path, "main")

    assert "[main]\nsource = sqlite\nbase = m.db\n" == path.read_text()


def test_url_values_render_a_section_that_reads_back_the_same_url() -> None:
    """A URL's keys, rendered and parsed, give back the very same URL."""
    from sqlalchemy.engine import URL

    from dynaconnd.config import parse_config
    from dynaconnd.editing import render_section, url_values

    url = URL.create(
        "postgresql+psycopg",
        username="app@crm",
        password="p@ss:w/rd#1%7d+x",
        host="127.0.0.1",
        port=5432,
        database="crm",
        query={"sslmode": "disable"},
    )

    text = render_section("crm", url_values(url))
    config = parse_config(text.encode(), path="source.ini")

    assert url == config.specs["crm"].url
