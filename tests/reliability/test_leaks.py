"""The leak scan: planted passwords and authkeys never show anywhere.

Every test of this suite registers what it captured (daemon and client
logs, outcomes, CLI output, error messages) with ``LEAKS``; the session
fails if a planted password or a daemon's authkey is in any of it.
This module adds what the others do not capture (``dynaconnd --check``
on the whole corpus, the masked views a client reads of a failing
database), proves the scan finds what it looks for, and, running last,
asserts over everything registered so far.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy.engine import URL

from dynaconnd.__main__ import check
from tests.reliability.conftest import (
    LEAKS,
    PLANTED,
    PLANTED_URL,
    DaemonFactory,
    LeakScan,
    assert_no_leak,
    sqlite_section,
)

if TYPE_CHECKING:
    from pathlib import Path

CORPUS = os.path.join(os.path.dirname(__file__), "corpus")


@pytest.fixture
def corpus_copy(tmp_path: Path) -> Path:
    """Copy the corpus beside a planted password file."""
    folder = tmp_path / "corpus"
    shutil.copytree(CORPUS, folder)
    secret = folder / "planted-password.txt"
    secret.write_text(PLANTED + "\n")
    secret.chmod(0o600)
    return folder


def test_check_command_prints_no_secret_for_any_corpus_file(
    corpus_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``dynaconnd --check`` on each bad file names problems, not secrets."""
    files = sorted(corpus_copy.glob("*.ini"))

    statuses = [check(str(path)) for path in files]

    output = capsys.readouterr()
    assert_no_leak("dynaconnd --check of the corpus", output.out + output.err)
    assert len(files) >= 40
    assert set(statuses) <= {0, 1}
    assert statuses.count(1) >= 40


def test_check_command_as_a_process_prints_no_secret(
    corpus_copy: Path,
) -> None:
    """The real ``dynaconnd --check`` on secret-bearing files stays clean."""
    names = [
        "indented-password-continues-port.ini",
        "secret-file-read-but-port-bad.ini",
        "url-unparsable.ini",
        "duplicate-password-key.ini",
    ]
    outputs = []
    for name in names:
        command = [sys.executable, "-m", "dynaconnd", "--check", "--config"]
        result = subprocess.run(
            [*command, str(corpus_copy / name)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        outputs.append((result.returncode, result.stdout + result.stderr))

    assert [1] * len(names) == [status for status, _ in outputs]
    for name, (_, text) in zip(names, outputs, strict=True):
        assert_no_leak(f"dynaconnd --check {name}", text)
        assert name in text


def test_failing_database_views_show_no_password(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    """What a client reads of a failing database never holds its password."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    (tmp_path / "d").mkdir()
    ini = (
        sqlite_section(tmp_path / "d", "main")
        + "[crm]\nsource = postgresql\nusername = app\n"
        f"password = {PLANTED_URL}\nhost = 127.0.0.1\nport = {port}\n"
        "base = crm\nhealth_interval = 300ms\nhealth_timeout = 1s\n"
        "connect_timeout = 1s\n"
    )
    daemon = start_daemon(ini)
    client = daemon.connect()
    daemon.wait_event(
        "health.changed",
        where=lambda e: e["database"] == "crm" and e["to"] == "down",
    )

    views: dict[str, Any] = {
        "describe": client.describe("crm"),
        "health": client.health(),
        "ping": client.ping("crm"),
        "outcome": client.last_outcome(),
        "repr": repr(client),
    }

    assert "down" == views["health"]["crm"]["state"]
    assert views["health"]["crm"]["last_error"]
    for name, view in views.items():
        assert_no_leak(f"client {name}", json.dumps(view, default=str))


def test_the_scan_finds_secrets_in_every_form() -> None:
    """Plain, URL-encoded, JSON-escaped, case-folded and hex forms count."""
    key = os.urandom(32)
    scan = LeakScan([PLANTED, PLANTED_URL, key])
    texts = [
        f"password={PLANTED}",
        URL.create(
            "postgresql", username="u", password=PLANTED_URL, host="h"
        ).render_as_string(hide_password=False),
        json.dumps({"password": PLANTED_URL}),
        PLANTED.lower(),
        f"key {key.hex()}",
    ]

    found = [scan.register(f"text {n}", text) for n, text in enumerate(texts)]

    assert all(found), found
    assert [] == scan.register("clean", "password=***")


def test_no_captured_text_leaks_a_secret() -> None:
    """Nothing any test of the suite registered so far holds a secret."""
    assert [] == LEAKS.hits()
    assert LEAKS.texts
