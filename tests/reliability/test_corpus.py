"""A corpus of bad source.ini files, each applied to one running daemon.

The daemon serves a good registry (``main`` and ``keep``); each case
replaces source.ini as an editor would, and DESIGN.md's reload rule is
checked through a client and the daemon's events: a file that cannot be
read or parsed changes nothing; a file with bad sections applies only
the valid ones (a bad section keeps its previous definition, a new one
stays absent); each bad file gives exactly one ``config.rejected``
naming the file, and the section, key and line where there is one.  No
planted password shows anywhere.  Then the good file is put back.

Stored files start with comments that state what is expected::

    # expect: file | sections | valid
    # rejected: NAME, ...        (sections)
    # names: NAME, ...           (the registry afterwards)
    # issue: section=S key=K line=N   (``-`` for none; any number)

Files that cannot be stored (10 MB, a folder, a FIFO, links, UTF-16,
binary junk, a thousand sections, an unreadable file) are made at test
time.  The daemon runs without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH
(``setpriv``), so a mode 000 file is really unreadable to it although
the suite runs as root.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.conftest import IN_CI
from tests.helpers import wait_for
from tests.reliability.conftest import (
    PLANTED,
    STATS,
    DaemonFactory,
    DaemonProcess,
    assert_no_leak,
    replace_file,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from magenta_dynaconn._remote import RemoteRegistry

CORPUS = Path(__file__).with_name("corpus")

GOOD = (
    "[main]\nsource = sqlite\nbase = main.sqlite3\n\n"
    "[keep]\nsource = sqlite\nbase = keep.sqlite3\n"
)
GOOD_NAMES = ["main", "keep"]

# SQLite files the valid sections of the corpus point at.
_SQLITE_FILES = (
    "main",
    "keep",
    "fresh",
    "mydb",
    "donnees",
    "shujuku",
    "crm-eu",
    "main-upper",
)

_HEADER = re.compile(r"# (expect|rejected|names|issue): ?(.*)")

Issue = tuple[str | None, str | None, int | None]


@dataclasses.dataclass
class Case:
    """One bad file: how to put it in place and what must follow."""

    name: str
    expect: str
    data: bytes | None = None
    rejected: frozenset[str] = frozenset()
    names: list[str] = dataclasses.field(default_factory=lambda: GOOD_NAMES)
    issues: list[Issue] = dataclasses.field(default_factory=list)
    install: Callable[[Path], None] | None = None


def _field(text: str) -> str | None:
    return None if text == "-" else text


def _stored(path: Path) -> Case:
    """Read a corpus file and the expectations in its header comments."""
    data = path.read_bytes()
    text = data.removeprefix(codecs.BOM_UTF8).decode("utf-8", "replace")
    case = Case(name=path.name, expect="", data=data)
    for line in text.splitlines():
        match = _HEADER.fullmatch(line.rstrip("\r"))
        if match is None:
            continue
        kind, value = match.groups()
        if kind == "expect":
            case.expect = value
        elif kind == "rejected":
            case.rejected = frozenset(_split_names(value))
        elif kind == "names":
            case.names = _split_names(value)
        else:
            fields = re.fullmatch(r"section=(.*) key=(\S+) line=(\S+)", value)
            assert fields is not None, line
            section, key, number = fields.groups()
            case.issues.append(
                (
                    _field(section),
                    _field(key),
                    None if number == "-" else int(number),
                )
            )
    assert case.expect in {"file", "sections", "valid"}, path
    return case


def _split_names(value: str) -> list[str]:
    # Names are split on ", "; a name may itself start with a space.
    return value.split(", ") if value else []


# -- files made at test time -------------------------------------------


def _swap_in(config: Path, make: Callable[[Path], None]) -> None:
    """Make the new entry under a temp name, rename it over source.ini."""
    temp = config.with_name(".incoming")
    make(temp)
    os.replace(temp, config)


def _folder(config: Path) -> None:
    config.unlink()
    config.mkdir()


def _unreadable(config: Path) -> None:
    def make(temp: Path) -> None:
        temp.write_text(GOOD + "\n[secret]\nsource = sqlite\nbase = s.db\n")
        temp.chmod(0)

    _swap_in(config, make)


def _dangling(config: Path) -> None:
    _swap_in(config, lambda temp: temp.symlink_to("nowhere/source.ini"))


def _loop(config: Path) -> None:
    _swap_in(config, lambda temp: temp.symlink_to(config.name))


def _fifo(config: Path) -> None:
    _swap_in(config, lambda temp: os.mkfifo(temp))


def _thousand_sections() -> bytes:
    sections = [
        f"[db{number:04d}]\nsource = sqlite\nbase = x.sqlite3\n"
        f"password = {PLANTED}\n"
        for number in range(1000)
    ]
    return (GOOD + "\n" + "\n".join(sections)).encode()


def _ten_megabytes() -> bytes:
    padding = ("; " + "x" * 76 + "\n") * (10 * 1024 * 1024 // 80)
    return (GOOD + padding).encode()


GENERATED = [
    Case("generated: empty file", "file", data=b"", issues=[(None,) * 3]),
    Case(
        "generated: 10 MB file",
        "file",
        data=_ten_megabytes(),
        issues=[(None, None, None)],
    ),
    Case(
        "generated: UTF-16",
        "file",
        data=GOOD.encode("utf-16"),
        issues=[(None, None, None)],
    ),
    Case(
        "generated: UTF-32",
        "file",
        data=GOOD.encode("utf-32"),
        issues=[(None, None, None)],
    ),
    Case(
        "generated: binary junk", "file", data=random.Random(7).randbytes(4096)
    ),
    Case(
        "generated: a thousand sections",
        "sections",
        data=_thousand_sections(),
        rejected=frozenset(f"db{number:04d}" for number in range(1000)),
        # GOOD and a blank line fill 8 lines; each section takes 5.
        issues=[("db0000", "password", 12), ("db0999", "password", 5007)],
    ),
    Case("generated: folder in place of the file", "file", install=_folder),
    Case("generated: unreadable file", "file", install=_unreadable),
    Case("generated: dangling symlink", "file", install=_dangling),
    Case("generated: symlink loop", "file", install=_loop),
    Case("generated: FIFO in place of the file", "file", install=_fifo),
]

CASES = {
    case.name: case
    for case in [
        *(_stored(path) for path in sorted(CORPUS.glob("*.ini"))),
        *GENERATED,
    ]
}


# -- the daemon ---------------------------------------------------------


def _without_dac_override() -> tuple[str, ...]:
    """Return a prefix that runs a root command as root without DAC bypass."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        return ()
    return (setpriv, "--bounding-set", "-dac_override,-dac_read_search", "--")


@pytest.fixture(scope="module")
def corpus_daemon(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[DaemonProcess, RemoteRegistry]]:
    """Run one daemon on the good file for every case of the module."""
    factory = DaemonFactory(tmp_path_factory.mktemp("corpus"))
    folder = factory.folder / "d"
    folder.mkdir()
    for name in _SQLITE_FILES:
        with contextlib.closing(sqlite3.connect(folder / f"{name}.sqlite3")):
            pass
    secret = folder / "planted-password.txt"
    secret.write_text(PLANTED + "\n")
    secret.chmod(0o600)
    try:
        daemon = factory(GOOD, prefix=_without_dac_override())
        client = daemon.connect()
        wait_for(
            lambda: GOOD_NAMES == client.list_names(),
            timeout=5,
            what="the good file to be back",
        )
        yield daemon, client
    finally:
        factory.close()


def _outcome_event(daemon: DaemonProcess, after: int) -> tuple[int, Any]:
    """Wait for the reload that follows ``after``; return its event."""

    def find() -> tuple[int, dict[str, Any]] | None:
        events = daemon.read_events()
        for index in range(after, len(events)):
            if events[index].get("event") in {
                "config.rejected",
                "reload.applied",
            }:
                return index, events[index]
        daemon._fail_if_exited("a reload")
        return None

    found = wait_for(find, timeout=15, what="the reload of a corpus file")
    assert found is not None
    return found


def _restore(daemon: DaemonProcess, config: Path) -> int:
    """Put the good file back; return the index of its reload event."""
    if config.is_dir() and not config.is_symlink():
        config.rmdir()
    mark = daemon.mark()
    replace_file(config, GOOD)
    index, event = _outcome_event(daemon, mark)
    assert "reload.applied" == event["event"], event
    return index


def _issues(items: list[dict[str, Any]]) -> set[Issue]:
    return {(item["section"], item["key"], item["line"]) for item in items}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_file_follows_the_reload_rule(
    name: str, corpus_daemon: tuple[DaemonProcess, RemoteRegistry]
) -> None:
    """The outcome, the one event and the registry follow DESIGN.md."""
    daemon, client = corpus_daemon
    case = CASES[name]
    config = daemon.config
    if case.install is _unreadable and not daemon.prefix:
        reason = "root reads any file, and setpriv is missing"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    STATS["corpus"] += 1
    generation = client.generation

    mark = daemon.mark()
    if case.install is not None:
        case.install(config)
    else:
        assert case.data is not None
        replace_file(config, case.data)
    _index, event = _outcome_event(daemon, mark)
    outcome = client.last_outcome()
    # The event comes just before the generation file moves.
    wait_for(
        lambda: outcome["generation"] == client.generation,
        timeout=5,
        what="the client to see the reload",
    )
    names = client.list_names()
    checked = _dry_run(client, case)
    restored = _restore(daemon, config)

    # Exactly one error event for a bad file, none for a valid one.
    events = daemon.read_events()[mark:restored]
    rejections = [e for e in events if e["event"] == "config.rejected"]
    expected_count = 0 if case.expect == "valid" else 1
    assert expected_count == len(rejections), rejections
    assert str(config) == event["file"]
    assert case.names == names
    if case.expect == "file":
        assert (False, False, generation) == (
            event["applied"],
            outcome["applied"],
            outcome["generation"],
        )
        assert outcome["file_issues"]
        assert {str(config)} == {i["file"] for i in outcome["file_issues"]}
        assert _issues(event["errors"]) == _issues(outcome["file_issues"])
        assert set(case.issues) <= _issues(outcome["file_issues"])
    else:
        assert outcome["applied"]
        assert case.rejected == set(outcome["rejected"])
        errors = [i for issues in outcome["rejected"].values() for i in issues]
        assert set(case.issues) <= _issues(errors)
        assert (set(case.rejected) & set(GOOD_NAMES)) == set(outcome["kept"])
        if case.rejected:
            assert _issues(errors) == _issues(event["errors"])
    if checked is not None:
        assert (case.expect == "valid") == checked["ok"]
        assert case.rejected == set(checked["rejected"])

    # No secret in what the daemon said about it.
    assert_no_leak(f"events of {name}", json.dumps(events))
    assert_no_leak(f"outcome of {name}", json.dumps(outcome))
    assert_no_leak(f"check of {name}", json.dumps(checked))
    wait_for(
        lambda: GOOD_NAMES == client.list_names(),
        timeout=5,
        what="the good file to be back",
    )


def _dry_run(client: RemoteRegistry, case: Case) -> dict[str, Any] | None:
    """Return ``dynaconn check`` of the case, for text files only."""
    if case.data is None or len(case.data) > 1024 * 1024:
        return None
    try:
        text = case.data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if "\x00" in text:
        return None
    return client.check(text)


def test_corpus_holds_at_least_forty_stored_files() -> None:
    """The stored corpus is large enough to mean something."""
    stored = [case for case in CASES.values() if case.install is None]

    assert len(list(CORPUS.glob("*.ini"))) >= 40
    assert len(stored) >= 50
