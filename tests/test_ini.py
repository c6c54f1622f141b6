"""Specifications for dynaconnd.ini: reading source.ini with line numbers."""

from __future__ import annotations

import codecs
import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dynaconnd.errors import ConfigError, ConfigIssue
from dynaconnd.ini import IniEntry, read_ini, split_lines

PATH = "/etc/dynaconn/source.ini"


def issues_of(data: bytes) -> list[ConfigIssue]:
    """Return the issues read_ini raises for ``data``."""
    with pytest.raises(ConfigError) as caught:
        read_ini(data, path=PATH)
    return caught.value.issues


def test_sections_keep_file_order_header_lines_and_key_lines() -> None:
    """Each section knows its header line and each key its own line."""
    ini = read_ini(
        b"# top\n[main]\nsource = sqlite\n\n[crm]\nHost = db\nport = 1\n",
        path=PATH,
    )

    assert ["main", "crm"] == list(ini.sections)
    assert 2 == ini.sections["main"].line
    assert 5 == ini.sections["crm"].line
    assert 7 == ini.sections["crm"].end_line
    assert (
        IniEntry("host", "db", "crm", 6, 6)
        == (ini.sections["crm"].entries["host"])
    )


def test_percent_signs_are_read_verbatim() -> None:
    """No interpolation: ``50%off%(x)s`` stays exactly as written (C13)."""
    ini = read_ini(b"[crm]\npassword = 50%off%(x)s\n", path=PATH)

    assert "50%off%(x)s" == ini.sections["crm"].entries["password"].value


def test_semicolon_and_hash_inside_a_value_are_kept() -> None:
    """No inline comments: ``abc;def#ghi`` keeps both marks (C15)."""
    ini = read_ini(b"[crm]\npassword = abc;def#ghi\nport = 1 ; x\n", path=PATH)

    entries = ini.sections["crm"].entries
    assert "abc;def#ghi" == entries["password"].value
    assert "1 ; x" == entries["port"].value


def test_whole_line_comments_are_ignored() -> None:
    """Lines starting with # or ; (even indented) are comments."""
    ini = read_ini(
        b"; head\n[crm]\n# note\nhost = db\n   ; indented\n", path=PATH
    )

    assert {"host": "db"} == {
        key: entry.value for key, entry in ini.sections["crm"].entries.items()
    }


def test_default_section_applies_to_every_section() -> None:
    """[DEFAULT] keys are merged beneath each section's own keys."""
    ini = read_ini(
        b"[DEFAULT]\nport = 1\nhost = h\n[a]\nport = 2\n[b]\n", path=PATH
    )

    merged_a = ini.merged("a")
    assert ["a", "b"] == list(ini.sections)
    assert ("2", 5, "a") == (
        merged_a["port"].value,
        merged_a["port"].line,
        merged_a["port"].section,
    )
    assert ("h", 3, "DEFAULT") == (
        merged_a["host"].value,
        merged_a["host"].line,
        merged_a["host"].section,
    )
    assert {"port": "1", "host": "h"} == {
        key: entry.value for key, entry in ini.merged("b").items()
    }


def test_indented_lines_continue_a_value() -> None:
    """A deeper indented line continues the value, as configparser does."""
    ini = read_ini(b"[crm]\ninclude_tables = a,\n    b\nhost = h\n", path=PATH)

    entry = ini.sections["crm"].entries["include_tables"]
    assert ("a,\nb", 2, 3) == (entry.value, entry.line, entry.end_line)


def test_utf8_bom_is_accepted_and_remembered() -> None:
    """A UTF-8 byte order mark is stripped before parsing."""
    ini = read_ini(codecs.BOM_UTF8 + b"[main]\nsource = sqlite\n", path=PATH)

    assert ["main"] == list(ini.sections)
    assert ini.has_bom


def test_crlf_line_endings_are_read() -> None:
    """Windows line endings do not end up in values."""
    ini = read_ini(b"[main]\r\nsource = sqlite\r\n", path=PATH)

    assert "sqlite" == ini.sections["main"].entries["source"].value


def test_utf16_is_rejected_with_a_clear_issue() -> None:
    """UTF-16 text (with its BOM) is refused and named as UTF-16."""
    data = "[main]\nsource = sqlite\n".encode("utf-16")

    [issue] = issues_of(data)

    assert (PATH, None, None) == (issue.file, issue.section, issue.key)
    assert "UTF-16" in issue.message


def test_utf16_without_bom_is_rejected_as_binary() -> None:
    """UTF-16 without its mark shows up as NUL bytes and is refused."""
    [issue] = issues_of("[main]\n".encode("utf-16-le"))

    assert "NUL" in issue.message


def test_invalid_utf8_is_rejected_naming_the_line() -> None:
    """Latin-1 bytes are not UTF-8; the issue gives the line they are on."""
    [issue] = issues_of(b"[main]\nsource = sqlite\nbase = caf\xe9.db\n")

    assert 3 == issue.line
    assert "UTF-8" in issue.message


def test_duplicate_sections_are_reported_with_both_lines() -> None:
    """A second [crm] is an issue naming its line and the first one (C14)."""
    [issue] = issues_of(b"[crm]\nhost = a\n\n[crm]\nhost = b\n")

    assert ("crm", None, 4) == (issue.section, issue.key, issue.line)
    assert "line 1" in issue.message
    assert "line 4" in issue.message


def test_keys_differing_only_in_case_are_duplicates() -> None:
    """``base`` and ``Base`` clash; both lines are named (C14)."""
    [issue] = issues_of(b"[crm]\nbase = a\nhost = h\nBase = b\n")

    assert (PATH, "crm", "base", 4) == (
        issue.file,
        issue.section,
        issue.key,
        issue.line,
    )
    assert "line 2" in issue.message
    assert "'Base'" in issue.message


def test_all_problems_are_reported_together() -> None:
    """Every bad line, orphan key and duplicate is one issue, all at once."""
    issues = issues_of(
        b"orphan = 1\n"
        b"[a]\n"
        b"just some words\n"
        b"host = x\n"
        b"host = y\n"
        b"[a]\n"
        b"= nothing\n"
    )

    assert [
        (None, None, 1),
        ("a", None, 3),
        ("a", "host", 5),
        ("a", None, 6),
        ("a", None, 7),
    ] == [(issue.section, issue.key, issue.line) for issue in issues]
    assert "before any [section]" in issues[0].message
    assert "'key = value'" in issues[1].message


def test_a_line_that_is_not_a_pair_is_not_echoed() -> None:
    """A stray line may be a password; its text is not in the issue."""
    [issue] = issues_of(b"[crm]\nhunter2-secret-line\n")

    assert "hunter2" not in str(issue)


def test_empty_file_has_no_sections() -> None:
    """An empty or comment-only file reads as no sections at all."""
    ini = read_ini(b"# nothing here\n\n", path=PATH)

    assert {} == dict(ini.sections)
    assert ini.defaults is None


def test_split_lines_splits_only_on_newline() -> None:
    """Only ``\\n`` ends a line, as configparser reads files."""
    assert ["a\r\n", "b\x0cc\n", "d"] == split_lines("a\r\nb\x0cc\nd")


@given(st.binary(max_size=300))
def test_only_config_error_escapes_for_arbitrary_bytes(data: bytes) -> None:
    """Any bytes either read or raise ConfigError, nothing else."""
    with contextlib.suppress(ConfigError):
        read_ini(data, path=PATH)


@given(st.text(alphabet="[]=:;# \n\tabcAB%$\r", max_size=200))
def test_only_config_error_escapes_for_ini_like_text(text: str) -> None:
    """Text made of INI punctuation either reads or raises ConfigError."""
    with contextlib.suppress(ConfigError):
        read_ini(text.encode(), path=PATH)
