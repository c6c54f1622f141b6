"""Specifications for dynaconnd.config: validating source.ini."""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import os
import string
from typing import TYPE_CHECKING, NoReturn

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import make_url
from structlog.testing import capture_logs

from dynaconnd import config as config_module
from dynaconnd.config import (
    KNOWN_KEYS,
    LoadedConfig,
    load_config,
    parse_config,
    validate_section,
)
from dynaconnd.errors import ConfigError, ConfigIssue
from dynaconnd.spec import EngineOptions, ReflectionScope, Schedule

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

PATH = "/srv/app/source.ini"
C8_PASSWORD = "p@ss:w/rd#1%7d+x"
PLANTED = "Pl4nted-S3cret!xyz"


def parse(
    text: str, *, environ: Mapping[str, str] | None = None
) -> LoadedConfig:
    """Validate ``text`` as the source.ini at PATH, with no environment."""
    return parse_config(text.encode(), path=PATH, environ=environ or {})


def only_issue(config: LoadedConfig, name: str) -> ConfigIssue:
    """Return the single issue of rejected section ``name``."""
    [issue] = config.rejected[name]
    return issue


def file_issues(data: bytes) -> list[ConfigIssue]:
    """Return the issues parse_config raises for ``data``."""
    with pytest.raises(ConfigError) as caught:
        parse_config(data, path=PATH, environ={})
    return caught.value.issues


# -- whole sections -----------------------------------------------------------


def test_sqlite_relative_base_resolves_against_the_folder_of_source_ini() -> (
    None
):
    """``base = ./main.db`` means main.db beside source.ini, not the cwd."""
    config = parse("[main]\nsource = sqlite\nbase = ./data/main.db\n")

    assert "/srv/app/data/main.db" == config.specs["main"].url.database
    assert "sqlite" == config.specs["main"].url.drivername


def test_sqlite_absolute_base_is_kept() -> None:
    """An absolute sqlite path is used as written."""
    config = parse("[main]\nsource = sqlite\nbase = /var/lib/x.db\n")

    assert "/var/lib/x.db" == config.specs["main"].url.database


@pytest.mark.parametrize(
    ("source", "drivername"),
    [
        ("postgresql", "postgresql+psycopg"),
        ("PostgreSQL", "postgresql+psycopg"),
        ("mysql", "mysql+pymysql"),
        ("mariadb", "mariadb+pymysql"),
        ("postgresql+psycopg", "postgresql+psycopg"),
        ("mysql+pymysql", "mysql+pymysql"),
    ],
)
def test_source_picks_the_default_driver(source: str, drivername: str) -> None:
    """A bare dialect gets the driver the project's extras install."""
    config = parse(f"[db]\nsource = {source}\nhost = h\nbase = b\n")

    assert drivername == config.specs["db"].url.drivername


def test_driver_key_completes_the_source() -> None:
    """``driver = psycopg`` with ``source = postgresql`` is one drivername."""
    config = parse("[db]\nsource = postgresql\ndriver = psycopg\n")

    assert "postgresql+psycopg" == config.specs["db"].url.drivername


def test_driver_key_contradicting_the_source_is_rejected() -> None:
    """``source = mysql+pymysql`` with ``driver = mysqldb`` is an issue."""
    config = parse("[db]\nsource = mysql+pymysql\ndriver = mysqldb\n")

    issue = only_issue(config, "db")
    assert ("driver", 3) == (issue.key, issue.line)


def test_server_section_builds_the_url_from_its_parts() -> None:
    """username, password, host, port and base become URL fields."""
    config = parse(
        "[crm]\nsource = postgresql\nusername = app_user\n"
        "password = s3cret\nhost = 127.0.0.1\nport = 5432\nbase = crm\n"
    )

    url = config.specs["crm"].url
    assert ("app_user", "s3cret", "127.0.0.1", 5432, "crm") == (
        url.username,
        url.password,
        url.host,
        url.port,
        url.database,
    )


def test_url_characters_in_password_and_user_survive_a_round_trip() -> None:
    """C8: the URL is built from fields; rendered and parsed back, it holds."""
    config = parse(
        "[crm]\nsource = postgresql\nusername = svc@corp\n"
        f"password = {C8_PASSWORD}\nhost = db\nbase = crm\n"
    )

    url = config.specs["crm"].url
    back = make_url(url.render_as_string(hide_password=False))
    assert (C8_PASSWORD, "svc@corp") == (back.password, back.username)
    assert C8_PASSWORD not in repr(config.specs["crm"])
    assert C8_PASSWORD not in config.specs["crm"].masked_url


def test_percent_in_password_is_read_verbatim() -> None:
    """C13: ``50%off%(x)s`` needs no doubling and is not interpolated."""
    config = parse("[crm]\nsource = postgresql\npassword = 50%off%(x)s\n")

    assert "50%off%(x)s" == config.specs["crm"].url.password


def test_semicolon_and_hash_in_password_are_kept() -> None:
    """C15: ``abc;def#ghi`` is the whole password."""
    config = parse("[crm]\nsource = postgresql\npassword = abc;def#ghi\n")

    assert "abc;def#ghi" == config.specs["crm"].url.password


def test_url_key_replaces_the_parts() -> None:
    """A full URL is accepted, with the default driver filled in."""
    config = parse("[crm]\nurl = postgresql://u:pw@db:6432/crm\n")

    url = config.specs["crm"].url
    assert ("postgresql+psycopg", "db", 6432, "pw") == (
        url.drivername,
        url.host,
        url.port,
        url.password,
    )


def test_url_with_relative_sqlite_path_resolves_beside_source_ini() -> None:
    """``sqlite:///rel.db`` is relative to the folder of source.ini."""
    config = parse("[main]\nurl = sqlite:///rel.db\n")

    assert "/srv/app/rel.db" == config.specs["main"].url.database


def test_url_and_parts_together_are_rejected() -> None:
    """url with host (or any part) is an issue naming both lines."""
    config = parse("[crm]\nurl = postgresql://db/crm\nhost = other\n")

    issue = only_issue(config, "crm")
    assert ("url", 2) == (issue.key, issue.line)
    assert "host (line 3)" in issue.message


def test_malformed_url_is_rejected_without_echoing_it() -> None:
    """A URL that does not parse is an issue that does not quote it."""
    config = parse(f"[crm]\nurl = postgresql://u:{PLANTED}@db:port/x\n")

    issue = only_issue(config, "crm")
    assert "url" == issue.key
    assert PLANTED not in str(issue)


def test_query_keys_become_url_query_parameters() -> None:
    """``query.sslmode = require`` lands in the URL's query."""
    config = parse(
        "[crm]\nsource = postgresql\nhost = db\nquery.sslmode = require\n"
    )

    assert {"sslmode": "require"} == dict(config.specs["crm"].url.query)


def test_engine_schedule_and_reflection_options_are_typed() -> None:
    """Engine options, durations, booleans and lists are parsed."""
    config = parse(
        "[db]\nsource = sqlite\nbase = x.db\n"
        "pool_size = 5\nmax_overflow = -1\npool_recycle = 30m\n"
        "pool_pre_ping = off\npool_timeout = 2.5\nconnect_timeout = 500ms\n"
        "echo = Yes\nhealth_interval = 10s\nhealth_timeout = 1s\n"
        "reflect_interval = 1h\nschemas = public, audit\n"
        "include_tables = a,b,\nexclude_tables =\n"
    )

    spec = config.specs["db"]
    assert (
        EngineOptions(
            pool_size=5,
            max_overflow=-1,
            pool_recycle=1800.0,
            pool_pre_ping=False,
            pool_timeout=2.5,
            connect_timeout=0.5,
            echo=True,
        )
        == spec.engine
    )
    assert Schedule(10.0, 1.0, 3600.0) == spec.schedule
    assert ReflectionScope(("public", "audit"), ("a", "b"), ()) == (
        spec.reflection
    )


def test_default_section_is_inherited_by_every_section() -> None:
    """[DEFAULT] keys apply to each section unless it sets its own."""
    config = parse(
        "[DEFAULT]\nhealth_interval = 5s\nsource = sqlite\n"
        "[a]\nbase = a.db\n[b]\nbase = b.db\nhealth_interval = 7s\n"
    )

    assert ["a", "b"] == list(config.specs)
    assert 5.0 == config.specs["a"].schedule.health_interval
    assert 7.0 == config.specs["b"].schedule.health_interval


def test_issue_from_a_default_value_names_its_line_and_origin() -> None:
    """A bad [DEFAULT] value is reported in each section, at its own line."""
    config = parse("[DEFAULT]\nport = none\n[a]\nsource = postgresql\n")

    issue = only_issue(config, "a")
    assert ("a", "port", 2) == (issue.section, issue.key, issue.line)
    assert "[DEFAULT]" in issue.message


def test_default_server_settings_do_not_spoil_sqlite_sections() -> None:
    """[DEFAULT] credentials serve server sections; sqlite ignores them."""
    config = parse(
        "[DEFAULT]\nusername = app\npassword = s3cret\nport = 5432\n"
        "[main]\nsource = sqlite\nbase = m.db\n"
        "[crm]\nsource = postgresql\nhost = db\n"
    )

    assert "sqlite:////srv/app/m.db" == (
        config.specs["main"].url.render_as_string(hide_password=False)
    )
    assert ("app", "s3cret", 5432) == (
        config.specs["crm"].url.username,
        config.specs["crm"].url.password,
        config.specs["crm"].url.port,
    )


def test_own_url_wins_over_inherited_parts() -> None:
    """A section's url replaces the parts [DEFAULT] would give it."""
    config = parse(
        "[DEFAULT]\nsource = postgresql\nhost = db\n"
        "[a]\nbase = a\n[b]\nurl = mysql://u@other/b\n"
    )

    assert ("db", "other") == (
        config.specs["a"].url.host,
        config.specs["b"].url.host,
    )


def test_own_password_source_wins_over_an_inherited_one(
    tmp_path: Path,
) -> None:
    """password_file in a section overrides a [DEFAULT] password."""
    (tmp_path / "pw").write_text("from-file\n")
    (tmp_path / "pw").chmod(0o600)
    path = tmp_path / "source.ini"
    path.write_text(
        "[DEFAULT]\npassword = shared\n"
        "[crm]\nsource = postgresql\npassword_file = pw\n"
    )

    config = load_config(path, environ={})

    assert "from-file" == config.specs["crm"].url.password


# -- rejected sections --------------------------------------------------------


def test_port_with_inline_comment_is_rejected_naming_the_key() -> None:
    """C15: ``port = 5432 ; note`` is not a number, and says why."""
    config = parse(
        "[crm]\nsource = postgresql\nhost = db\nport = 5432 ; note\n"
    )

    issue = only_issue(config, "crm")
    assert (PATH, "crm", "port", 4) == (
        issue.file,
        issue.section,
        issue.key,
        issue.line,
    )
    assert "1 to 65535" in issue.message
    assert "comments after a value are not supported" in issue.message


@pytest.mark.parametrize(
    ("port", "ok"),
    [
        ("0", False),
        ("1", True),
        ("65535", True),
        ("65536", False),
        ("-1", False),
        ("5432.0", False),
        ("٥٤٣٢", False),
    ],
)
def test_port_must_be_a_whole_number_from_1_to_65535(
    port: str, ok: bool
) -> None:
    """Ports outside 1-65535, or not plain digits, are rejected."""
    config = parse(f"[crm]\nsource = postgresql\nport = {port}\n")

    assert ok == ("crm" in config.specs)


def test_unknown_key_suggests_the_closest_known_key() -> None:
    """A typo gets a "did you mean" naming the right key."""
    config = parse("[crm]\nsource = sqlite\nbase = x.db\nbsae = y.db\n")

    issue = only_issue(config, "crm")
    assert ("bsae", 4) == (issue.key, issue.line)
    assert "did you mean 'base'?" in issue.message


def test_unknown_key_without_a_close_match_lists_the_known_keys() -> None:
    """With nothing close, the message lists what would be accepted."""
    config = parse("[main]\nsource = sqlite\nbase = x.db\nzzzzzz = 1\n")

    message = only_issue(config, "main").message
    assert all(key in message for key in KNOWN_KEYS)


def test_unknown_dialect_lists_the_known_ones() -> None:
    """``source = postgres`` suggests postgresql and lists every kind."""
    config = parse("[crm]\nsource = postgres\n")

    issue = only_issue(config, "crm")
    assert ("source", 2) == (issue.key, issue.line)
    assert "did you mean 'postgresql'?" in issue.message
    assert "sqlite, postgresql, mysql, mariadb" in issue.message


def test_unknown_driver_lists_the_known_drivers() -> None:
    """``postgresql+nosuch`` names the drivers SQLAlchemy has for it."""
    config = parse("[crm]\nsource = postgresql+nosuch\n")

    message = only_issue(config, "crm").message
    assert "'nosuch'" in message
    assert "psycopg" in message


def test_missing_driver_module_names_what_to_install() -> None:
    """A driver whose module is absent says which pip install brings it."""
    config = parse("[db]\nsource = mysql+mysqldb\nhost = h\n")

    message = only_issue(config, "db").message
    assert "'MySQLdb'" in message
    assert "pip install mysqlclient" in message
    assert "pip install 'magenta-dynaconn[mysql]'" in message


def test_asyncio_driver_is_rejected() -> None:
    """The daemon builds synchronous engines, so asyncpg is refused."""
    config = parse("[db]\nsource = postgresql+asyncpg\n")

    message = only_issue(config, "db").message
    assert "asyncio" in message
    assert "postgresql+psycopg" in message


def test_missing_source_is_reported_at_the_section_header() -> None:
    """A section with neither source nor url names source at its header."""
    config = parse("[main]\n\n[crm]\nhost = db\n")

    issue = only_issue(config, "crm")
    assert ("source", 3) == (issue.key, issue.line)


def test_sqlite_rejects_server_keys_and_needs_base() -> None:
    """sqlite takes no host or port, and needs a base file."""
    config = parse("[main]\nsource = sqlite\nhost = h\nport = 1\n")

    assert [("host", 3), ("port", 4), ("base", 1)] == [
        (issue.key, issue.line) for issue in config.rejected["main"]
    ]


def test_all_issues_of_a_section_are_reported_together() -> None:
    """Every bad key of a section is one issue, all in one result."""
    config = parse(
        "[crm]\nsource = postgresql\nport = x\npool_size = -2\n"
        "echo = maybe\nhealth_interval = 5 parsecs\nbsae = 1\n"
    )

    assert ["bsae", "port", "pool_size", "echo", "health_interval"] == [
        issue.key for issue in config.rejected["crm"]
    ]
    assert all(
        (PATH, "crm") == (issue.file, issue.section) and issue.line is not None
        for issue in config.rejected["crm"]
    )


def test_valid_section_next_to_an_invalid_one_still_loads() -> None:
    """One bad section is rejected; its neighbours are applied."""
    config = parse(
        "[main]\nsource = sqlite\nbase = main.db\n\n"
        "[crm]\nsource = postgresql\nport = 5432 ; note\n"
    )

    assert ["main"] == list(config.specs)
    assert ["crm"] == list(config.rejected)


@pytest.mark.parametrize("name", [" padded ", "tab\there"])
def test_odd_section_names_are_rejected(name: str) -> None:
    """Names with surrounding spaces or control characters are refused."""
    with pytest.raises(ConfigError):
        validate_section(name, {"source": "sqlite", "base": "x.db"})


# -- the file as a whole ------------------------------------------------------


def test_duplicate_keys_reject_the_whole_file() -> None:
    """C14: ``base`` and ``Base`` make the file unusable, naming both lines."""
    issues = file_issues(
        b"[main]\nsource = sqlite\nbase = a\n[crm]\nbase = x\nBase = y\n"
    )

    assert [("crm", "base", 6)] == [
        (issue.section, issue.key, issue.line) for issue in issues
    ]
    assert "line 5" in issues[0].message


def test_duplicate_sections_reject_the_whole_file() -> None:
    """C14: a section defined twice refuses the whole file."""
    issues = file_issues(b"[a]\nsource = sqlite\n[a]\nsource = sqlite\n")

    assert [("a", None, 3)] == [
        (issue.section, issue.key, issue.line) for issue in issues
    ]


@pytest.mark.parametrize(
    "text", ["", "   \n\n", "# only\n; comments\n", "[DEFAULT]\nport = 1\n"]
)
def test_file_without_database_sections_is_never_applied(text: str) -> None:
    """An empty or comment-only file is an error, not an empty registry."""
    [issue] = file_issues(text.encode())

    assert "no database sections" in issue.message


def test_utf8_bom_is_accepted() -> None:
    """A file saved with a BOM (Notepad) reads as usual."""
    config = parse_config(
        codecs.BOM_UTF8 + b"[main]\nsource = sqlite\nbase = m.db\n",
        path=PATH,
    )

    assert ["main"] == list(config.specs)


@pytest.mark.parametrize(
    "data",
    [
        "[main]\nsource = sqlite\n".encode("utf-16"),
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
        b"[main]\nbase = \xff\xfe\n",
    ],
)
def test_utf16_and_binary_junk_are_rejected(data: bytes) -> None:
    """Anything that is not UTF-8 text is one clear file-level error."""
    [issue] = file_issues(data)

    assert (PATH, None, None) == (issue.file, issue.section, issue.key)


def test_content_hash_is_the_sha256_of_the_bytes() -> None:
    """content_hash lets a reload skip a save that changed nothing."""
    data = b"[main]\nsource = sqlite\nbase = m.db\n"

    config = parse_config(data, path=PATH)

    assert hashlib.sha256(data).hexdigest() == config.content_hash


def test_load_config_reads_the_file(tmp_path: Path) -> None:
    """load_config reads the file and keeps the path it was given."""
    path = tmp_path / "source.ini"
    path.write_text("[main]\nsource = sqlite\nbase = m.db\n")

    config = load_config(path)

    assert (str(path), str(tmp_path / "m.db")) == (
        config.path,
        config.specs["main"].url.database,
    )


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """A file that does not exist is one file-level issue."""
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.ini")


def test_directory_is_a_config_error(tmp_path: Path) -> None:
    """A folder given as source.ini is refused as a folder."""
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    """A file without read permission is refused, saying so."""
    path = tmp_path / "source.ini"
    path.write_text("[main]\nsource = sqlite\nbase = m.db\n")
    path.chmod(0)

    with pytest.raises(ConfigError, match="permission denied"):
        load_config(path)


def test_permission_denied_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file this user may not read is refused, saying so (even as root)."""
    path = tmp_path / "source.ini"
    path.write_text("[main]\nsource = sqlite\nbase = m.db\n")

    def denied(*args: object, **kwargs: object) -> NoReturn:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(config_module, "open", denied, raising=False)

    with pytest.raises(ConfigError, match="permission denied"):
        load_config(path)


def test_huge_file_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    """A 10 MB file is refused before it is parsed."""
    path = tmp_path / "source.ini"
    path.write_bytes(b"[main]\n" + b"# padding\n" * 1_000_000)

    with pytest.raises(ConfigError, match="the limit is 4194304 bytes"):
        load_config(path)


# -- validate_section ---------------------------------------------------------


def test_validate_section_takes_a_dict_with_any_key_case() -> None:
    """add_instance data validates like a section, keys case-insensitive."""
    spec = validate_section(
        "new", {"Source": "sqlite", "BASE": "x.db"}, base_dir="/data"
    )

    assert "/data/x.db" == spec.url.database


def test_validate_section_raises_config_error_with_every_issue() -> None:
    """An invalid section raises one ConfigError listing all issues."""
    with pytest.raises(ConfigError) as caught:
        validate_section("new", {"source": "nosuchdb", "port": "0"})

    assert ["source", "port"] == sorted(
        (issue.key or "" for issue in caught.value.issues), reverse=True
    )


# -- secrets never echoed -----------------------------------------------------


def test_password_never_appears_in_issues_reprs_or_logs() -> None:
    """A planted password is absent from errors, specs and log events."""
    text = (
        "[ok]\nsource = postgresql\nhost = db\n"
        f"password = {PLANTED}\n\n"
        "[bad]\nsource = postgresql\n"
        f"password = {PLANTED}\nport = {PLANTED}\n"
        f"health_interval = {PLANTED}\nbsae = {PLANTED}\n"
    )

    with capture_logs() as events:
        config = parse(text)
        with pytest.raises(ConfigError) as caught:
            validate_section(
                "x", {"source": "nosuch", "password": PLANTED, "echo": "?"}
            )

    assert 3 == len(config.rejected["bad"])
    shown = [
        repr(config.specs),
        str(config.specs["ok"].describe()),
        str(caught.value),
        repr(caught.value.issues),
        *(str(issue) for issue in config.issues),
        *(repr(issue) for issue in config.issues),
        repr(events),
    ]
    assert [] == [text for text in shown if PLANTED in text]


def test_password_part_of_a_url_is_never_echoed() -> None:
    """Issues about a url with a password do not print that password."""
    config = parse(
        f"[crm]\nurl = postgresql://u:{PLANTED}@db:99999/x\n"
        "query.x = 1\necho = bad\n"
    )

    assert [] == [
        str(issue) for issue in config.issues if PLANTED in str(issue)
    ]
    assert 2 == len(config.issues)


_KEYS = st.sampled_from(
    [*sorted(KNOWN_KEYS), "query.sslmode", "bsae", "Port", "pasword", "x"]
)
_VALUES = st.text(
    alphabet=string.ascii_letters + string.digits + " ;#%:/@+.-_${}",
    max_size=30,
)


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=150)
@given(st.lists(st.tuples(_KEYS, _VALUES), max_size=12), st.booleans())
def test_planted_password_is_never_echoed_for_any_section(
    pairs: list[tuple[str, str]], via_env: bool
) -> None:
    """Whatever else a section holds, its password is in no message."""
    password = "${PW}" if via_env else PLANTED
    lines = [f"{key} = {value}" for key, value in pairs if key != "password"]
    text = "[db]\n" + "\n".join([*lines, f"password = {password}"]) + "\n"

    try:
        config = parse(text, environ={"PW": PLANTED})
    except ConfigError as error:
        shown = str(error)
    else:
        shown = repr(config) + "".join(map(str, config.issues))
    assert PLANTED not in shown


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=200)
@given(st.binary(max_size=400))
def test_only_config_error_escapes_parse_config(data: bytes) -> None:
    """Arbitrary bytes either load or raise ConfigError, nothing else."""
    with contextlib.suppress(ConfigError):
        parse_config(data, path=PATH, environ={})
