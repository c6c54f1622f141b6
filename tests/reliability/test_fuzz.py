"""Property-based fuzzing of the source.ini reader and validator.

``parse_config`` is fed mutated copies of a valid file (lines deleted,
duplicated, swapped, indented; bytes flipped; random unicode, keys and
values inserted).  Whatever it is given: only ``ConfigError`` escapes,
every section of the file is either in ``specs`` or in ``rejected``, a
valid section stays valid beside a broken one, and the planted password
appears in no issue.  ``derandomize`` keeps the examples the same from
run to run.
"""

from __future__ import annotations

import configparser
import os
import tempfile
from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynaconnd.config import KNOWN_KEYS, parse_config
from dynaconnd.errors import ConfigError
from tests.reliability.conftest import PLANTED, assert_no_leak

if TYPE_CHECKING:
    from collections.abc import Iterator

    from dynaconnd.config import LoadedConfig

BASE = (
    "[DEFAULT]\n"
    "health_interval = 30s\n"
    "\n"
    "[good]\n"
    "source = sqlite\n"
    "base = good.sqlite3\n"
    "\n"
    "[crm]\n"
    "source = postgresql\n"
    "driver = psycopg\n"
    f"password = {PLANTED}\n"
    "username = app\n"
    "host = 127.0.0.1\n"
    "port = 5432\n"
    "base = crm\n"
    "pool_size = 5\n"
    "\n"
    "[other]\n"
    "source = mysql\n"
    "username = ${DYNACONN_FUZZ_USER}\n"
    "password_file = planted-password.txt\n"
    "host = db.example\n"
    "port = 3306\n"
    "base = other\n"
    "echo = false\n"
).encode()

ENVIRON = {"DYNACONN_FUZZ_USER": "fuzzer"}

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

_KEYS = st.sampled_from(
    [*sorted(KNOWN_KEYS), "query.sslmode", "colour", "Password", "PORT"]
)
_VALUES = st.one_of(
    st.sampled_from(
        ["", "5432", "0", "-1", "sqlite", "postgresql", "30s", "yes", "~/x"]
    ),
    st.text(max_size=20),
)
_LINES = st.one_of(
    st.builds(lambda key, value: f"{key} = {value}", _KEYS, _VALUES),
    st.builds(lambda name: f"[{name}]", st.text(max_size=12)),
    st.text(max_size=30),
)


@pytest.fixture(scope="module")
def config_path() -> Iterator[str]:
    """Return a source.ini path whose folder holds the password file."""
    with tempfile.TemporaryDirectory(prefix="dynaconn-fuzz-") as folder:
        secret = os.path.join(folder, "planted-password.txt")
        with open(secret, "w") as handle:
            handle.write(PLANTED + "\n")
        os.chmod(secret, 0o600)
        yield os.path.join(folder, "source.ini")


def _mutate(data: st.DataObject, text: bytes) -> bytes:
    """Apply one to four random edits to ``text``."""
    lines = text.split(b"\n")
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        edit = data.draw(
            st.sampled_from(
                [
                    "delete",
                    "duplicate",
                    "swap",
                    "indent",
                    "insert",
                    "flip",
                    "unicode",
                ]
            ),
            label="edit",
        )
        at = data.draw(st.integers(0, max(0, len(lines) - 1)), label="at")
        if edit == "delete" and lines:
            del lines[at]
        elif edit == "duplicate" and lines:
            to = data.draw(st.integers(0, len(lines)), label="to")
            lines.insert(to, lines[at])
        elif edit == "swap" and lines:
            to = data.draw(st.integers(0, len(lines) - 1), label="to")
            lines[at], lines[to] = lines[to], lines[at]
        elif edit == "indent" and lines:
            lines[at] = b"  " + lines[at]
        elif edit == "insert":
            lines.insert(at, data.draw(_LINES, label="line").encode())
        elif edit in {"flip", "unicode"} and lines:
            line = lines[at]
            spot = data.draw(st.integers(0, len(line)), label="spot")
            if edit == "flip" and line:
                spot = min(spot, len(line) - 1)
                bit = data.draw(st.integers(1, 255), label="xor")
                line = (
                    line[:spot] + bytes([line[spot] ^ bit]) + line[spot + 1 :]
                )
            else:
                extra = data.draw(st.text(min_size=1, max_size=3), label="u")
                line = line[:spot] + extra.encode() + line[spot:]
            lines[at] = line
    return b"\n".join(lines)


def _configparser(data: bytes) -> configparser.RawConfigParser:
    """Read ``data`` with configparser alone, set up as source.ini is."""
    parser = configparser.RawConfigParser(
        delimiters=("=", ":"),
        comment_prefixes=("#", ";"),
        inline_comment_prefixes=None,
        strict=True,
        empty_lines_in_values=False,
        interpolation=None,
    )
    parser.read_string(data.decode("utf-8-sig"))
    return parser


GOOD_VALUES = dict(_configparser(BASE).items("good"))


def _check(data: bytes, path: str) -> LoadedConfig | None:
    """Parse ``data``; assert every property; return what loaded."""
    error: ConfigError | None = None
    try:
        loaded = parse_config(data, path=path, environ=ENVIRON)
    except ConfigError as raised:
        error = raised
    if error is not None:
        assert error.issues
        assert {path} == {issue.file for issue in error.issues}
        assert PLANTED.lower() not in str(error).lower()
        return None

    # The section rule: every section is judged, none is lost.
    names = set(_configparser(data).sections())
    assert set() == set(loaded.specs) & set(loaded.rejected)
    assert names == set(loaded.specs) | set(loaded.rejected)
    for name, issues in loaded.rejected.items():
        assert issues
        assert {(path, name)} == {
            (issue.file, issue.section) for issue in issues
        }
        assert PLANTED.lower() not in repr(issues).lower()
    return loaded


@FUZZ
@given(data=st.data())
def test_mutated_files_raise_config_error_or_judge_every_section(
    data: st.DataObject, config_path: str
) -> None:
    """Only ConfigError escapes, and no section is silently lost."""
    mutated = _mutate(data, BASE)

    loaded = _check(mutated, config_path)

    # A valid section stays valid, whatever broke beside it.
    if loaded is None:
        return
    parser = _configparser(mutated)
    if parser.has_section("good") and GOOD_VALUES == dict(
        parser.items("good")
    ):
        assert "good" in loaded.specs, loaded.rejected.get("good")


@FUZZ
@given(
    pairs=st.lists(st.tuples(_KEYS, _VALUES), max_size=8),
    password=st.booleans(),
)
def test_random_keys_and_values_never_spoil_the_valid_section(
    pairs: list[tuple[str, str]], password: bool, config_path: str
) -> None:
    """A section of random keys is judged alone; the good one loads."""
    lines = ["[fuzz]"]
    if password:
        lines.append(f"password = {PLANTED}")
    lines += [f"{key} = {value}" for key, value in pairs]
    data = BASE + ("\n" + "\n".join(lines) + "\n").encode()

    loaded = _check(data, config_path)

    if loaded is not None:
        assert {"good", "crm", "other"} <= set(loaded.specs)
        assert "fuzz" in {*loaded.specs, *loaded.rejected}
        assert_no_leak("fuzz issues", repr(loaded.issues))


def test_the_unmutated_file_is_valid(config_path: str) -> None:
    """The file the fuzzer starts from loads whole, so mutations matter."""
    loaded = parse_config(BASE, path=config_path, environ=ENVIRON)

    assert (["good", "crm", "other"], {}) == (
        list(loaded.specs),
        dict(loaded.rejected),
    )
