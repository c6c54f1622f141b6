"""Specifications for dynaconnd.secrets and the secret keys of source.ini."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from structlog.testing import capture_logs

from dynaconnd.config import load_config, parse_config
from dynaconnd.logs import MASK, redact
from dynaconnd.secrets import (
    SecretError,
    expand_references,
    read_credential,
    read_password_file,
)

if TYPE_CHECKING:
    from pathlib import Path

    from dynaconnd.config import LoadedConfig

FILE_SECRET = "fr0m-the-F1le!"
ENV_SECRET = "fr0m-the-Env!"
CRED_SECRET = "fr0m-systemd-Cred!"

SERVER = "source = postgresql\nhost = db\n"


def write_ini(folder: Path, text: str) -> Path:
    """Write ``text`` as source.ini in ``folder`` and return its path."""
    path = folder / "source.ini"
    path.write_text(text)
    return path


def secret_file(path: Path, text: str, mode: int = 0o600) -> Path:
    """Write a password file with ``mode`` and return its path."""
    path.write_text(text)
    path.chmod(mode)
    return path


def all_text(config: LoadedConfig) -> str:
    """Return every issue and spec of ``config`` as one string."""
    return repr(config) + "".join(str(issue) for issue in config.issues)


# -- ${NAME} references -------------------------------------------------------


def test_references_are_replaced_from_the_environment() -> None:
    """``${NAME}`` takes the variable's value; other text stays."""
    assert "db-1:5432" == expand_references(
        "${HOST}:${PORT}", {"HOST": "db-1", "PORT": "5432"}
    )


def test_double_dollar_escapes_a_literal_reference() -> None:
    """``$${`` stands for ``${``; a lone ``$`` is kept as it is."""
    assert "${NOT}$5 a$b" == expand_references("$${NOT}$5 a$b", {})


def test_missing_variables_are_all_named_once() -> None:
    """Every unset variable is named, each once."""
    with pytest.raises(SecretError) as caught:
        expand_references("${A}${B}${A}", {})

    assert "${A}, ${B}" in str(caught.value)


def test_malformed_reference_is_not_echoed() -> None:
    """``${`` without a proper name is refused without quoting the text."""
    with pytest.raises(SecretError) as caught:
        expand_references("hunter2${oops", {})

    assert "hunter2" not in str(caught.value)
    assert "$${" in str(caught.value)


def test_env_reference_in_password_is_resolved() -> None:
    """``password = ${PGPASSWORD}`` reads the variable."""
    config = parse_config(
        f"[crm]\n{SERVER}password = ${{PGPASSWORD}}\n".encode(),
        path="/etc/source.ini",
        environ={"PGPASSWORD": ENV_SECRET},
    )

    assert ENV_SECRET == config.specs["crm"].url.password
    assert MASK == redact(ENV_SECRET)


def test_env_reference_works_in_any_value() -> None:
    """References are expanded in every key, not only passwords."""
    config = parse_config(
        b"[crm]\nsource = postgresql\nhost = ${DBHOST}\nport = ${PORT}\n",
        path="/etc/source.ini",
        environ={"DBHOST": "db-7", "PORT": "6543"},
    )

    assert ("db-7", 6543) == (
        config.specs["crm"].url.host,
        config.specs["crm"].url.port,
    )


def test_missing_env_variable_names_the_variable_for_that_section() -> None:
    """An unset variable rejects only its section, naming the variable."""
    config = parse_config(
        f"[crm]\n{SERVER}password = ${{PGPASSWORD}}\n"
        "[main]\nsource = sqlite\nbase = m.db\n".encode(),
        path="/etc/source.ini",
        environ={},
    )

    [issue] = config.rejected["crm"]
    assert ("password", 4) == (issue.key, issue.line)
    assert "${PGPASSWORD}" in issue.message
    assert ["main"] == list(config.specs)


# -- password_file ------------------------------------------------------------


def test_password_file_first_line_is_the_password(tmp_path: Path) -> None:
    """Only the first line counts, without its line ending."""
    secret_file(tmp_path / "pw", f"{FILE_SECRET}\r\nsecond line\n")

    assert FILE_SECRET == read_password_file("pw", base_dir=str(tmp_path))
    assert MASK == redact(FILE_SECRET)


def test_password_file_is_relative_to_source_ini(tmp_path: Path) -> None:
    """A relative password_file is found beside source.ini, and watched."""
    (tmp_path / "secrets").mkdir()
    secret_file(tmp_path / "secrets" / "crm", FILE_SECRET + "\n")
    path = write_ini(tmp_path, f"[crm]\n{SERVER}password_file = secrets/crm\n")

    config = load_config(path, environ={})

    spec = config.specs["crm"]
    expected = str(tmp_path / "secrets" / "crm")
    assert (FILE_SECRET, expected) == (spec.url.password, spec.password_file)
    assert (expected,) == config.watched_files


def test_group_readable_password_file_logs_a_warning(tmp_path: Path) -> None:
    """A 0644 password file still works, with an insecure-file event."""
    secret = secret_file(tmp_path / "pw", FILE_SECRET, mode=0o644)

    with capture_logs() as events:
        read_password_file(str(secret), base_dir="/")

    assert [("config.insecure_secret_file", "warning", "0644")] == [
        (event["event"], event["log_level"], event["mode"]) for event in events
    ]
    assert FILE_SECRET not in repr(events)


def test_private_password_file_logs_nothing(tmp_path: Path) -> None:
    """A 0600 password file is read silently."""
    secret = secret_file(tmp_path / "pw", FILE_SECRET)

    with capture_logs() as events:
        read_password_file(str(secret), base_dir="/")

    assert [] == events


def test_missing_password_file_rejects_only_its_section(
    tmp_path: Path,
) -> None:
    """A password file that is not there is an issue naming the file."""
    path = write_ini(
        tmp_path,
        f"[crm]\n{SERVER}password_file = nope\n"
        "[main]\nsource = sqlite\nbase = m.db\n",
    )

    config = load_config(path, environ={})

    [issue] = config.rejected["crm"]
    assert ("password_file", 4) == (issue.key, issue.line)
    assert str(tmp_path / "nope") in issue.message
    assert ["main"] == list(config.specs)
    assert (str(tmp_path / "nope"),) == config.watched_files


@pytest.mark.parametrize(
    ("content", "words"),
    [(b"", "empty first line"), (b"\xff\xfe\n", "not UTF-8")],
)
def test_unusable_password_file_is_an_issue(
    tmp_path: Path, content: bytes, words: str
) -> None:
    """Empty or non-UTF-8 password files are refused, saying why."""
    (tmp_path / "pw").write_bytes(content)

    with pytest.raises(SecretError, match=words):
        read_password_file("pw", base_dir=str(tmp_path))


def test_secret_from_a_file_is_never_in_issues(tmp_path: Path) -> None:
    """A password read from a file stays out of every message."""
    secret_file(tmp_path / "pw", FILE_SECRET)
    path = write_ini(
        tmp_path,
        "[a]\nsource = sqlite\nbase = a.db\npassword_file = pw\n"
        "[b]\nurl = postgresql://u:x@db/b\npassword_file = pw\n",
    )

    with capture_logs() as events:
        config = load_config(path, environ={})

    assert ["a", "b"] == list(config.rejected)
    assert FILE_SECRET not in all_text(config)
    assert FILE_SECRET not in repr(events)


# -- password_credential ------------------------------------------------------


def test_credential_is_read_from_the_credentials_directory(
    tmp_path: Path,
) -> None:
    """``password_credential`` reads $CREDENTIALS_DIRECTORY/NAME."""
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "crm-db").write_text(CRED_SECRET + "\n")
    path = write_ini(
        tmp_path, f"[crm]\n{SERVER}password_credential = crm-db\n"
    )

    config = load_config(
        path, environ={"CREDENTIALS_DIRECTORY": str(tmp_path / "creds")}
    )

    assert CRED_SECRET == config.specs["crm"].url.password
    assert () == config.watched_files
    assert MASK == redact(CRED_SECRET)


def test_credentials_dir_argument_wins_over_the_environment(
    tmp_path: Path,
) -> None:
    """An explicit credentials_dir is used as given."""
    (tmp_path / "crm-db").write_text(CRED_SECRET)

    assert CRED_SECRET == read_credential(
        "crm-db", credentials_dir=str(tmp_path)
    )


def test_credential_without_credentials_directory_is_an_issue(
    tmp_path: Path,
) -> None:
    """Outside systemd the issue names $CREDENTIALS_DIRECTORY."""
    path = write_ini(tmp_path, f"[crm]\n{SERVER}password_credential = crm\n")

    config = load_config(path, environ={})

    [issue] = config.rejected["crm"]
    assert "password_credential" == issue.key
    assert "$CREDENTIALS_DIRECTORY" in issue.message


@pytest.mark.parametrize("name", ["../etc/shadow", "a/b", "..", ""])
def test_credential_names_cannot_leave_the_directory(
    tmp_path: Path, name: str
) -> None:
    """A credential name is a bare file name."""
    with pytest.raises(SecretError, match="not a credential name"):
        read_credential(name, credentials_dir=str(tmp_path))


# -- choosing one source ------------------------------------------------------


def test_only_one_password_source_per_section(tmp_path: Path) -> None:
    """password with password_file is an issue naming both lines."""
    secret_file(tmp_path / "pw", FILE_SECRET)
    path = write_ini(
        tmp_path,
        f"[crm]\n{SERVER}password = {ENV_SECRET}\npassword_file = pw\n",
    )

    config = load_config(path, environ={})

    [issue] = config.rejected["crm"]
    assert ("password_file", 5) == (issue.key, issue.line)
    assert "password (line 4)" in issue.message
    assert ENV_SECRET not in str(issue)
