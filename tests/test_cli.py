"""``dynaconn``, the operator's command line, against a real dynaconnd."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

from magenta_dynaconn.cli import main
from tests.conftest import ini_section
from tests.daemon_harness import (
    DaemonProcess,
    clean_environment,
    start_dynaconnd,
)
from tests.helpers import wait_for

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from sqlalchemy.engine import URL

__all__ = ["start_dynaconnd"]

PLANTED = "Planted-Pa55word-4cli"

#: Long enough that the watcher never reloads during a test: the
#: reloads these tests look at are the ones the command asks for.
NO_WATCH = ("--debounce", "60s")

CLI_TIMEOUT = 30.0

Start = Callable[..., DaemonProcess]


def sqlite_section(folder: Path, name: str, extra: str = "") -> str:
    """Create SQLite database ``name`` with a table; return its section."""
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}.sqlite3"
    connection = sqlite3.connect(path)
    try:
        connection.execute("CREATE TABLE IF NOT EXISTS item (id INTEGER)")
        connection.commit()
    finally:
        connection.close()
    return (
        f"[{name}]\nsource = sqlite\nbase = {path}\n"
        f"health_interval = 1s\n{extra}\n"
    )


def run(
    capsys: pytest.CaptureFixture[str], daemon: DaemonProcess, *argv: str
) -> tuple[int, str, str]:
    """Run ``dynaconn argv`` in this process; return status and output."""
    capsys.readouterr()
    status = main(daemon.cli_argv(*argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def run_json(
    capsys: pytest.CaptureFixture[str],
    daemon: DaemonProcess,
    *argv: str,
    status: int = 0,
) -> Any:
    """Run ``dynaconn argv --json``; return its output parsed."""
    actual, out, err = run(capsys, daemon, *argv, "--json")
    assert (status, "") == (actual, err)
    return json.loads(out)


def run_process(
    argv: list[str], *, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the command line in a process of its own."""
    environ = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("DYNACONN_")
    }
    environ.update(env or {})
    return subprocess.run(
        argv,
        env=environ,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """Start dynaconnd on two SQLite databases, main and crm.

    The tests that use it only read: they share one daemon.
    """
    home = tmp_path_factory.mktemp("two")
    ini = sqlite_section(home, "main") + sqlite_section(home, "crm")
    with DaemonProcess(
        home / "daemon",
        ini=ini,
        args=["--debounce", "50ms"],
        state_dir=None,
        env=clean_environment(),
    ) as daemon:
        yield daemon


def states(capsys: pytest.CaptureFixture[str], daemon: DaemonProcess) -> Any:
    """Return each database's state from ``status --json``."""
    status = run_json(capsys, daemon, "status")
    return {row["name"]: row["state"] for row in status["databases"]}


# -- status, ls, tables, describe, health, ping ----------------------------


def test_status_json_gives_every_database_and_the_generation(
    capsys: pytest.CaptureFixture[str], two: DaemonProcess
) -> None:
    """status --json names each database in file order with its figures."""
    wait_for(
        lambda: states(capsys, two) == {"main": "up", "crm": "up"},
        what="both databases up",
    )

    status = run_json(capsys, two, "status")

    assert 1 == status["generation"]
    assert ["main", "crm"] == [row["name"] for row in status["databases"]]
    row = status["databases"][0]
    described = run_json(capsys, two, "describe", "main")
    assert (0, described["schema_generation"], None) == (
        row["consecutive_failures"],
        row["schema_generation"],
        row["last_error"],
    )
    assert isinstance(row["latency_ms"], float)
    assert isinstance(row["since"], float)


def test_status_prints_a_table_under_the_registry_generation(
    capsys: pytest.CaptureFixture[str], two: DaemonProcess
) -> None:
    """status prints the generation, a header and one row per database."""
    wait_for(
        lambda: states(capsys, two) == {"main": "up", "crm": "up"},
        what="both databases up",
    )

    status, out, err = run(capsys, two, "status")

    lines = out.splitlines()
    assert (0, "") == (status, err)
    assert "registry generation 1, 2 databases" == lines[0]
    assert ["DATABASE", "STATE", "LATENCY", "MS", "SINCE"] == (
        lines[1].split()[:5]
    )
    assert [["main", "up"], ["crm", "up"]] == [
        line.split()[:2] for line in lines[2:]
    ]


def test_ls_prints_names_one_per_line_and_as_json(
    capsys: pytest.CaptureFixture[str], two: DaemonProcess
) -> None:
    """ls prints the names in file order; --json gives the same list."""
    status, out, err = run(capsys, two, "ls")

    assert (0, "main\ncrm\n", "") == (status, out, err)
    assert ["main", "crm"] == run_json(capsys, two, "ls")


def test_tables_lists_what_the_daemon_reflected(
    capsys: pytest.CaptureFixture[str], two: DaemonProcess
) -> None:
    """tables NAME prints each reflected table on a line of its own."""
    status, out, err = run(capsys, two, "tables", "main")

    assert (0, "item\n", "") == (status, out, err)
    assert ["item"] == run_json(capsys, two, "tables", "crm")


@pytest.mark.postgresql
def test_describe_never_prints_the_password(
    capsys: pytest.CaptureFixture[str], start_dynaconnd: Start, pg_url: URL
) -> None:
    """describe shows the URL masked; neither output carries the secret."""
    # The shared server trusts 127.0.0.1, so any password connects.
    daemon = start_dynaconnd(
        ini_section("crm", pg_url.set(password=PLANTED)), args=NO_WATCH
    )

    status, out, err = run(capsys, daemon, "describe", "crm")
    described = run_json(capsys, daemon, "describe", "crm")

    assert (0, "") == (status, err)
    assert PLANTED not in out
    assert PLANTED not in json.dumps(described)
    assert f"url: {described['url']}" in out.splitlines()
    assert ("postgres", pg_url.database) == (
        described["username"],
        described["database"],
    )
    assert ":***@" in described["url"]


def test_ping_probes_now_and_health_shows_the_record(
    capsys: pytest.CaptureFixture[str], two: DaemonProcess
) -> None:
    """ping NAME reports a fresh probe; health NAME the state and history."""
    status, out, err = run(capsys, two, "ping", "main")
    pinged = run_json(capsys, two, "ping", "main")

    assert (0, "") == (status, err)
    assert out.startswith("main: ok in ")
    assert (True, "main") == (pinged["ok"], pinged["database"])

    record = run_json(capsys, two, "health", "main")
    assert "up" == record["state"]
    assert pinged["checked_at"] in [
        result["checked_at"] for result in record["history"]
    ]
    status, out, err = run(capsys, two, "health", "main")
    assert (0, "") == (status, err)
    assert "state: up" in out.splitlines()


@pytest.mark.parametrize(
    "argv", [["tables"], ["describe"], ["ping"], ["health"]]
)
def test_unknown_database_is_one_line_and_status_1(
    capsys: pytest.CaptureFixture[str], two: DaemonProcess, argv: list[str]
) -> None:
    """A name the registry lacks gives one line naming close matches."""
    status, out, err = run(capsys, two, *argv, "mian")

    assert (1, "") == (status, out)
    assert [
        "dynaconn: unknown database 'mian'; did you mean main?"
        " (known: crm, main)"
    ] == err.splitlines()


# -- reload and check ------------------------------------------------------


def test_reload_prints_what_changed(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, start_dynaconnd: Start
) -> None:
    """reload prints added, changed, removed and unchanged; status 0."""
    data = tmp_path / "data"
    daemon = start_dynaconnd(
        sqlite_section(data, "main")
        + sqlite_section(data, "crm")
        + sqlite_section(data, "old"),
        args=NO_WATCH,
    )
    daemon.config.write_text(
        sqlite_section(data, "main")
        + sqlite_section(data, "crm", "health_timeout = 2s\n")
        + sqlite_section(data, "new")
    )

    status, out, err = run(capsys, daemon, "reload")

    assert (0, "") == (status, err)
    assert [
        "reload applied: generation 1 -> 2",
        "added: new",
        "changed: crm",
        "removed: old",
        "unchanged: main",
    ] == out.splitlines()


def test_reload_with_a_rejected_section_says_where_and_exits_1(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, start_dynaconnd: Start
) -> None:
    """Each rejection is file:line [section] key: message; status 1."""
    data = tmp_path / "data"
    daemon = start_dynaconnd(sqlite_section(data, "main"), args=NO_WATCH)
    daemon.config.write_text(
        sqlite_section(data, "main")
        + "[crm]\nsource = postgresql\nhost = 127.0.0.1\nport = 54x\n"
    )

    status, out, err = run(capsys, daemon, "reload")

    rejected = [line for line in out.splitlines() if "rejected" in line]
    assert (1, "") == (status, err)
    assert [
        f"rejected: {daemon.config}:9 [crm] port: '54x' is not a port;"
        " expected a whole number from 1 to 65535",
    ] == [line for line in rejected if "port" in line]


def test_check_agrees_with_the_reload_that_follows(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, start_dynaconnd: Start
) -> None:
    """What check FILE prints is what a reload of FILE then does."""
    data = tmp_path / "data"
    daemon = start_dynaconnd(
        sqlite_section(data, "main")
        + sqlite_section(data, "crm")
        + sqlite_section(data, "billing")
        + sqlite_section(data, "old"),
        args=NO_WATCH,
    )
    candidate = tmp_path / "candidate.ini"
    candidate.write_text(
        sqlite_section(data, "main")
        + sqlite_section(data, "crm", "health_timeout = 2s\n")
        + "[billing]\nsource = sqlite\nbase = b.db\nport = 1\n\n"
        + sqlite_section(data, "new")
        + "[broken]\nsource = nosuchdb\nbase = x\n"
    )

    status, printed, err = run(capsys, daemon, "check", str(candidate))
    checked = run_json(capsys, daemon, "check", str(candidate), status=1)
    shutil.copyfile(candidate, daemon.config)
    status_reload, out, _ = run(capsys, daemon, "reload", "--json")
    outcome = json.loads(out)

    assert (1, 1, "") == (status, status_reload, err)
    keys = ("added", "changed", "removed", "unchanged", "kept", "rejected")
    assert {key: outcome[key] for key in keys} == {
        key: checked[key] for key in keys
    }
    assert (["new"], ["crm"], ["old"], ["billing"], ["billing", "broken"]) == (
        outcome["added"],
        outcome["changed"],
        outcome["removed"],
        outcome["kept"],
        sorted(outcome["rejected"]),
    )
    issues = [
        issue for found in outcome["rejected"].values() for issue in found
    ]
    assert [
        f"{candidate} against dynaconnd at {daemon.socket}:",
        f"would add: {', '.join(outcome['added'])}",
        f"would change: {', '.join(outcome['changed'])}",
        f"would remove: {', '.join(outcome['removed'])}",
        f"would keep: {', '.join(outcome['unchanged'])}",
        f"would keep as before: {', '.join(outcome['kept'])}",
        *[
            f"rejected: {issue['file']}:{issue['line']} [{issue['section']}]"
            f" {issue['key']}: {issue['message']}"
            for issue in issues
        ],
    ] == printed.splitlines()


def test_check_of_a_clean_file_exits_0(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, two: DaemonProcess
) -> None:
    """A file with no problems is reported as kept and exits 0."""
    candidate = tmp_path / "same.ini"
    shutil.copyfile(two.config, candidate)

    status, out, err = run(capsys, two, "check", str(candidate))

    assert (0, "") == (status, err)
    assert "would keep: main, crm" in out.splitlines()


def test_check_of_an_unparsable_file_applies_nothing_and_exits_1(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, two: DaemonProcess
) -> None:
    """A duplicate section is a file issue: nothing would apply; status 1."""
    candidate = tmp_path / "dup.ini"
    candidate.write_text("[a]\nsource = sqlite\n[a]\nsource = sqlite\n")

    status, out, err = run(capsys, two, "check", str(candidate))
    checked = run_json(capsys, two, "check", str(candidate), status=1)

    assert (1, "") == (status, err)
    assert f"{candidate}: rejected, nothing would be applied" in out
    assert (False, [], 1) == (
        checked["ok"],
        checked["added"],
        len(checked["file_issues"]),
    )


# -- without a daemon ------------------------------------------------------


def test_commands_without_a_daemon_print_one_line_and_exit_2(
    tmp_path: Path, start_dynaconnd: Start
) -> None:
    """With the daemon stopped, the console script says so in one line."""
    two = start_dynaconnd(sqlite_section(tmp_path, "main"))
    assert 0 == two.stop()
    dynaconn = shutil.which("dynaconn", path=os.path.dirname(sys.executable))
    assert dynaconn is not None

    done = run_process([dynaconn, *two.cli_argv("status")])

    assert (2, "") == (done.returncode, done.stdout)
    assert [
        f"dynaconn: cannot reach dynaconnd at {two.socket}:"
        " No such file or directory; is it running?"
    ] == done.stderr.splitlines()


def test_unreadable_key_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, two: DaemonProcess
) -> None:
    """A key others may read is refused before connecting; status 2."""
    key = tmp_path / "key"
    shutil.copyfile(two.authkey_file, key)
    os.chmod(key, 0o644)

    capsys.readouterr()
    status = main(["--socket", two.socket, "--authkey-file", str(key), "ls"])
    out, err = capsys.readouterr()

    assert (2, "") == (status, out)
    assert [
        f"dynaconn: cannot read the authkey {key}: authkey file {key} has"
        " mode 0644; it must not be readable or writable by others"
        " (chmod 600 or 640)"
    ] == err.splitlines()


def test_check_without_a_daemon_validates_alone_and_says_so(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """python -m magenta_dynaconn check validates FILE by itself."""
    good = tmp_path / "good.ini"
    good.write_text("[main]\nsource = sqlite\nbase = main.db\n")
    bad = tmp_path / "bad.ini"
    bad.write_text("[main]\nsource = sqlite\nbase = main.db\nport = 1\n")
    runtime = tmp_path / "nothing"
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(runtime))
    for variable in ("DYNACONN_SOCKET", "DYNACONN_AUTHKEY_FILE"):
        monkeypatch.delenv(variable, raising=False)

    clean = run_process(
        [sys.executable, "-m", "magenta_dynaconn", "check", str(good)]
    )
    capsys.readouterr()
    status = main(["check", "--json", str(bad)])
    dirty = json.loads(capsys.readouterr().out)

    assert (0, 1) == (clean.returncode, status)
    assert [
        f"dynaconn: cannot read the authkey {runtime / 'authkey'}:"
        f" No such file or directory; checking {good} alone, as dynaconnd"
        " --check does"
    ] == clean.stderr.splitlines()
    assert "valid: main" in clean.stdout.splitlines()
    assert (None, False, ["main"]) == (
        dirty["daemon"],
        dirty["ok"],
        sorted(dirty["rejected"]),
    )


def test_defaults_come_from_the_environment_like_the_client(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    two: DaemonProcess,
) -> None:
    """DYNACONN_* and then $RUNTIME_DIRECTORY locate socket and key."""
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    os.symlink(two.socket, runtime / "dynaconnd.sock")
    os.symlink(two.authkey_file, runtime / "authkey")
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("DYNACONN_SOCKET", two.socket)
    monkeypatch.setenv("DYNACONN_AUTHKEY_FILE", two.authkey_file)

    capsys.readouterr()
    by_variables = main(["ls"])
    printed = capsys.readouterr()
    by_runtime = run_process(
        [sys.executable, "-m", "magenta_dynaconn", "ls"],
        env={"RUNTIME_DIRECTORY": str(runtime)},
    )

    assert (0, "main\ncrm\n", "") == (by_variables, *printed)
    assert (0, "main\ncrm\n", "") == (
        by_runtime.returncode,
        by_runtime.stdout,
        by_runtime.stderr,
    )
