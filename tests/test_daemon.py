"""The real daemon in a subprocess: saves, signals, shutdown, files."""

from __future__ import annotations

import datetime
import os
import shutil
import signal
import stat
import threading
import time
from typing import TYPE_CHECKING, Any

import psutil
import pytest

from tests.conftest import PG_ADMIN, ini_section
from tests.daemon_harness import (
    DENY_INOTIFY,
    NO_SECCOMP,
    START_TIMEOUT,
    DaemonFactory,
    inotify_can_be_denied,
    sqlite_section,
    write_atomically,
)
from tests.helpers import wait_for
from tests.proxy import TcpProxy

if TYPE_CHECKING:
    from pathlib import Path

    from sqlalchemy.engine import URL

    from magenta_dynaconn._remote import RemoteRegistry
    from tests.daemon_harness import DaemonProcess

#: A save is applied within about a second; a busy machine gets slack.
SAVE_LATENCY = 1.5
#: SIGTERM must end the daemon within this long, whatever hangs.
SHUTDOWN_BOUND = 10.0


def _timestamp(event: dict[str, Any]) -> float:
    return datetime.datetime.fromisoformat(event["timestamp"]).timestamp()


def _reloads(daemon: DaemonProcess, after: int) -> list[str]:
    """Return the names of reload events since ``after``, in order."""
    names = {"reload.applied", "reload.skipped", "config.rejected"}
    return [
        event["event"]
        for event in daemon.events(after=after)
        if event["event"] in names
    ]


def _assert_settled(daemon: DaemonProcess, after: int) -> None:
    """Fail if a watched-file event came after the last reload since after.

    Such an event would open another quiet window, hence another
    reload: the save was not handled exactly once.
    """
    events = daemon.events(after=after)
    kinds = [event["event"] for event in events]
    last_reload = max(
        index
        for index, kind in enumerate(kinds)
        if kind in {"reload.applied", "reload.skipped"}
    )
    late = [
        event
        for event in events[last_reload:]
        if event["event"] == "watcher.event"
    ]
    assert [] == late


class _NamePoller:
    """Call ``list_names()`` in a loop; remember any answer without main."""

    def __init__(self, registry: RemoteRegistry) -> None:
        self.registry = registry
        self.polls = 0
        self.bad: list[list[str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-poller")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            names = self.registry.list_names()
            self.polls += 1
            if "main" not in names:
                self.bad.append(names)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _vim_save(path: Path, text: str) -> None:
    """Save as vim does: move the file aside, write anew, drop the backup."""
    backup = path.with_name(path.name + "~")
    os.rename(path, backup)
    with open(path, "w") as handle:
        handle.write(text)
    os.unlink(backup)


# -- C1: saves -------------------------------------------------------------


def test_three_saves_by_rename_and_vim_are_each_applied_once(
    daemons: DaemonFactory, tmp_path: Path
) -> None:
    """Rename, vim, rename: three reloads, each within about a second."""
    data = tmp_path / "data"
    base = sqlite_section(data, "main")
    daemon = daemons.start(ini=base, log_level="debug")
    poller = _NamePoller(daemon.client())
    texts = [
        base + sqlite_section(data, "one"),
        base + sqlite_section(data, "two"),
        base + sqlite_section(data, "three"),
    ]
    saves = [write_atomically, _vim_save, write_atomically]

    try:
        start = daemon.mark()
        latencies = []
        added = []
        for save, text in zip(saves, texts, strict=True):
            mark = daemon.mark()
            saved_at = time.time()
            save(daemon.config, text)
            event = daemon.wait_event("reload.applied", after=mark)
            latencies.append(_timestamp(event) - saved_at)
            added.append(event["added"])
            _assert_settled(daemon, mark)
    finally:
        poller.stop()

    assert ["reload.applied"] * 3 == _reloads(daemon, start)
    assert [["one"], ["two"], ["three"]] == added
    assert all(latency < SAVE_LATENCY for latency in latencies), latencies
    assert ([], True) == (poller.bad, poller.polls > 0)


def test_symlink_swap_is_applied_once(
    daemons: DaemonFactory, tmp_path: Path
) -> None:
    """Replacing a source.ini symlink with one to a new file reloads once."""
    data = tmp_path / "data"
    etc = tmp_path / "daemon" / "etc"
    etc.mkdir(parents=True)
    (etc / "v1.ini").write_text(sqlite_section(data, "main"))
    (etc / "source.ini").symlink_to("v1.ini")
    daemon = daemons.start(config=etc / "source.ini", log_level="debug")
    mark = daemon.mark()

    (etc / "v2.ini").write_text(
        sqlite_section(data, "main") + sqlite_section(data, "two")
    )
    (etc / "tmp-link").symlink_to("v2.ini")
    os.replace(etc / "tmp-link", etc / "source.ini")
    event = daemon.wait_event("reload.applied", after=mark)
    _assert_settled(daemon, mark)

    assert (["two"], ["reload.applied"]) == (
        event["added"],
        _reloads(daemon, mark),
    )


def test_configmap_data_swap_is_applied_once(
    daemons: DaemonFactory, tmp_path: Path
) -> None:
    """Kubernetes' ..data symlink swap, old folder removed, reloads once."""
    data = tmp_path / "data"
    etc = tmp_path / "daemon" / "etc"
    (etc / "..2024_01_01_a").mkdir(parents=True)
    (etc / "..2024_01_01_a" / "source.ini").write_text(
        sqlite_section(data, "main")
    )
    (etc / "..data").symlink_to("..2024_01_01_a")
    (etc / "source.ini").symlink_to("..data/source.ini")
    daemon = daemons.start(config=etc / "source.ini", log_level="debug")
    mark = daemon.mark()

    # What the kubelet does: a new timestamped folder, a new ..data link
    # renamed over the old one, then the old folder removed.
    (etc / "..2024_01_01_b").mkdir()
    (etc / "..2024_01_01_b" / "source.ini").write_text(
        sqlite_section(data, "main") + sqlite_section(data, "two")
    )
    (etc / "..data_tmp").symlink_to("..2024_01_01_b")
    os.replace(etc / "..data_tmp", etc / "..data")
    shutil.rmtree(etc / "..2024_01_01_a")
    event = daemon.wait_event("reload.applied", after=mark)
    _assert_settled(daemon, mark)

    assert (["two"], ["reload.applied"]) == (
        event["added"],
        _reloads(daemon, mark),
    )


def test_delete_and_recreate_is_applied_once_and_never_empties(
    daemons: DaemonFactory, tmp_path: Path
) -> None:
    """Deleting source.ini and writing it again is one reload, no reject."""
    data = tmp_path / "data"
    base = sqlite_section(data, "main")
    daemon = daemons.start(ini=base, log_level="debug")
    registry = daemon.client()
    mark = daemon.mark()

    os.unlink(daemon.config)
    daemon.config.write_text(base + sqlite_section(data, "two"))
    event = daemon.wait_event("reload.applied", after=mark)
    _assert_settled(daemon, mark)

    assert (["two"], ["reload.applied"]) == (
        event["added"],
        _reloads(daemon, mark),
    )
    assert ["main", "two"] == wait_for(
        lambda: (
            registry.list_names() == ["main", "two"] and registry.list_names()
        ),
        what="the client to see the recreated file",
    )


def test_in_place_save_of_identical_content_gives_no_reload(
    daemons: DaemonFactory, tmp_path: Path
) -> None:
    """Rewriting source.ini with the same bytes is skipped, not applied."""
    text = sqlite_section(tmp_path / "data", "main")
    daemon = daemons.start(ini=text, log_level="debug")
    registry = daemon.client()
    generation = registry.generation
    mark = daemon.mark()

    with open(daemon.config, "w") as handle:
        handle.write(text)
    skipped = daemon.wait_event("reload.skipped", after=mark)
    _assert_settled(daemon, mark)

    assert "content unchanged" == skipped["reason"]
    assert ["reload.skipped"] == _reloads(daemon, mark)
    assert generation == registry.generation


# -- C2 and C3: bad bytes, no inotify ------------------------------------


def test_non_utf8_save_is_rejected_once_and_the_next_save_applies(
    daemons: DaemonFactory, tmp_path: Path
) -> None:
    """Bytes that are not UTF-8: one config.rejected, old registry stays."""
    data = tmp_path / "data"
    base = sqlite_section(data, "main")
    daemon = daemons.start(ini=base)
    registry = daemon.client()
    generation = registry.generation
    mark = daemon.mark()

    daemon.save_config(base.encode() + b"[caf\xe9]\nsource = sqlite\n")
    rejected = daemon.wait_event("config.rejected", after=mark)
    kept = (registry.list_names(), registry.generation)
    after_reject = daemon.mark()
    daemon.save_config(base + sqlite_section(data, "two"))
    applied = daemon.wait_event("reload.applied", after=after_reject)

    assert (False, generation) == (rejected["applied"], rejected["generation"])
    assert [str(daemon.config)] == [
        error["file"] for error in rejected["errors"]
    ]
    assert (["main"], generation) == kept
    assert ["config.rejected", "reload.applied"] == _reloads(daemon, mark)
    assert (["two"], generation + 1) == (
        applied["added"],
        applied["generation"],
    )
    assert [] == daemon.events("watcher.died")


@pytest.mark.skipif(
    not inotify_can_be_denied(), reason="no seccomp filter for this machine"
)
def test_daemon_without_inotify_falls_back_to_polling_and_applies_saves(
    daemons: DaemonFactory, tmp_path: Path
) -> None:
    """inotify refused (EMFILE): one error naming the sysctl, then polling."""
    data = tmp_path / "data"
    base = sqlite_section(data, "main")
    daemon = daemons.create(ini=base, wrapper=DENY_INOTIFY)
    daemon.start(wait_ready=False)
    try:
        ready = daemon.wait_event("daemon.ready", timeout=START_TIMEOUT)
    except AssertionError:
        if daemon.wait_exit() == NO_SECCOMP:
            pytest.skip("this kernel refuses seccomp filters")
        raise
    mark = daemon.mark()

    daemon.save_config(base + sqlite_section(data, "two"))
    applied = daemon.wait_event("reload.applied", after=mark)

    [unavailable] = daemon.events("watcher.inotify_unavailable")
    assert (
        "error",
        "max_user_instances",
        "fs.inotify.max_user_instances",
        "polling",
    ) == tuple(
        unavailable[key] for key in ("level", "limit", "sysctl", "fallback")
    )
    assert "polling" == ready["watch_mode"]
    assert ["two"] == applied["added"]


def test_poll_flag_watches_by_polling_and_applies_saves(
    daemons: DaemonFactory, tmp_path: Path
) -> None:
    """--poll: the daemon says it polls, and a save is still applied."""
    data = tmp_path / "data"
    base = sqlite_section(data, "main")
    daemon = daemons.start(ini=base, args=["--poll"])
    mark = daemon.mark()

    daemon.save_config(base + sqlite_section(data, "two"))
    applied = daemon.wait_event("reload.applied", after=mark)

    assert "polling" == daemon.events("daemon.ready")[0]["watch_mode"]
    assert ["two"] == applied["added"]


# -- signals and reload outcomes --------------------------------------------


def test_sighup_reloads_even_when_nothing_changed(
    daemons: DaemonFactory, tmp_path: Path
) -> None:
    """SIGHUP forces a reload: one signal.received, one reload.applied."""
    daemon = daemons.start(ini=sqlite_section(tmp_path / "data", "main"))
    mark = daemon.mark()

    daemon.send_signal(signal.SIGHUP)
    applied = daemon.wait_event("reload.applied", after=mark)

    assert ["SIGHUP"] == [
        event["signal"] for event in daemon.events("signal.received")
    ]
    assert (1, [], 1) == (
        applied["generation"],
        applied["changed"],
        applied["unchanged"],
    )


def test_reload_outcome_names_file_section_key_and_line_of_rejects(
    daemons: DaemonFactory, tmp_path: Path
) -> None:
    """Rejected sections reach clients with file, section, key and line."""
    data = tmp_path / "data"
    base = sqlite_section(data, "main")
    daemon = daemons.start(ini=base)
    registry = daemon.client()
    bad = (
        base.replace("\n\n", "\npool_size = many\n\n")
        + "[extra]\nsource = sqlite\nbase = x.db\nbsae = x.db\n"
    )
    mark = daemon.mark()

    daemon.save_config(bad)
    event = daemon.wait_event("config.rejected", after=mark)
    outcome = registry.reload()
    last = registry.last_outcome()

    path = str(daemon.config)
    assert ["main", "extra"] == list(outcome["rejected"])
    [pool_size] = outcome["rejected"]["main"]
    [typo] = outcome["rejected"]["extra"]
    assert (path, "main", "pool_size", 4) == (
        pool_size["file"],
        pool_size["section"],
        pool_size["key"],
        pool_size["line"],
    )
    assert (path, "extra", "bsae", 9) == (
        typo["file"],
        typo["section"],
        typo["key"],
        typo["line"],
    )
    assert "base" in typo["message"]
    assert (True, ["main"], 1) == (
        outcome["applied"],
        outcome["kept"],
        outcome["generation"],
    )
    assert outcome == last
    assert [pool_size, typo] == event["errors"]
    assert ["main"] == registry.list_names()


# -- C10: shutdown while something hangs -----------------------------------


def _held_connections(daemon: DaemonProcess, port: int) -> int:
    """Return how many TCP connections the daemon has open to ``port``."""
    connections = psutil.Process(daemon.pid).net_connections(kind="tcp")
    return sum(
        1
        for connection in connections
        if connection.raddr and connection.raddr.port == port
    )


def _hung_daemon(
    daemons: DaemonFactory, tmp_path: Path, pg_url: URL, proxy: TcpProxy
) -> DaemonProcess:
    """Start a daemon whose `hung` database never answers."""
    hung = proxy.url(pg_url)
    ini = (
        sqlite_section(tmp_path / "data", "main")
        + ini_section("hung", hung).rstrip("\n")
        # The driver waits this long to connect: far beyond the bound.
        + "\nhealth_timeout = 60s\nhealth_interval = 1s\n\n"
    )
    proxy.set_mode("blackhole")
    daemon = daemons.start(ini=ini)
    # The start-up health probe and reflection both wait on the host.
    wait_for(
        lambda: _held_connections(daemon, proxy.port) >= 2,
        what="the probe and the reflection to hang",
    )
    return daemon


def test_sigterm_ends_the_daemon_promptly_while_a_probe_hangs(
    daemons: DaemonFactory, tmp_path: Path, pg_url: URL
) -> None:
    """A probe and a reflection hung on a dead host: exit 0 within 10 s."""
    with TcpProxy(PG_ADMIN.host or "", PG_ADMIN.port or 0) as proxy:
        daemon = _hung_daemon(daemons, tmp_path, pg_url, proxy)

        started = time.monotonic()
        status = daemon.stop(timeout=SHUTDOWN_BOUND + 5)
        took = time.monotonic() - started

    assert 0 == status, daemon.tail()
    assert took < SHUTDOWN_BOUND, took
    assert not os.path.exists(daemon.socket)
    assert {"main", "hung"} == {
        event["database"] for event in daemon.events("engine.disposed")
    }
    last = daemon.events()[-1]
    assert ("daemon.stopped", 0) == (last["event"], last["status"])


def test_second_sigterm_during_a_slow_shutdown_exits_at_once(
    daemons: DaemonFactory, tmp_path: Path, pg_url: URL
) -> None:
    """A client's ping holds shutdown; a second SIGTERM ends it now."""
    with TcpProxy(PG_ADMIN.host or "", PG_ADMIN.port or 0) as proxy:
        daemon = _hung_daemon(daemons, tmp_path, pg_url, proxy)
        registry = daemon.client()
        held = _held_connections(daemon, proxy.port)
        failures: list[BaseException] = []

        def ping() -> None:
            try:
                registry.ping("hung")
            except Exception as error:
                failures.append(error)

        pinger = threading.Thread(target=ping, name="test-ping")
        pinger.start()
        try:
            # The ping probes in the server's thread, which shutdown
            # waits for: that is what makes this shutdown slow.
            wait_for(
                lambda: _held_connections(daemon, proxy.port) > held,
                what="the ping to hang",
            )
            mark = daemon.mark()
            daemon.send_signal(signal.SIGTERM)
            daemon.wait_event("daemon.stopping", after=mark)
            still_stopping = daemon.is_running()
            started = time.monotonic()
            status = daemon.stop(signal.SIGTERM, timeout=SHUTDOWN_BOUND)
            took = time.monotonic() - started
        finally:
            pinger.join()

    assert (True, 128 + signal.SIGTERM) == (still_stopping, status)
    assert took < 1.0, took
    assert ["RegistryUnavailableError"] == [
        type(error).__name__ for error in failures
    ]


# -- files and modes -----------------------------------------------------


def test_socket_and_key_are_private_to_the_daemon_user(
    daemons: DaemonFactory, tmp_path: Path
) -> None:
    """Socket 0600 in a 0700 folder, key 0600, and each is what it says."""
    daemon = daemons.start(ini=sqlite_section(tmp_path / "data", "main"))

    socket_mode = os.stat(daemon.socket).st_mode
    folder_mode = os.stat(os.path.dirname(daemon.socket)).st_mode
    key_mode = os.stat(daemon.authkey_file).st_mode

    assert (True, 0o600) == (
        stat.S_ISSOCK(socket_mode),
        stat.S_IMODE(socket_mode),
    )
    assert 0o700 == stat.S_IMODE(folder_mode)
    assert (True, 0o600) == (stat.S_ISREG(key_mode), stat.S_IMODE(key_mode))
    assert 32 == os.path.getsize(daemon.authkey_file)
    created = daemon.events("authkey.created")
    assert [("0600", daemon.authkey_file)] == [
        (event["mode"], event["path"]) for event in created
    ]


def test_world_readable_key_is_refused_and_the_daemon_exits(
    daemons: DaemonFactory, tmp_path: Path
) -> None:
    """A key others may read stops start-up with status 1 and no socket."""
    daemon = daemons.create(ini=sqlite_section(tmp_path / "data", "main"))
    key = daemon.folder / "run" / "authkey"
    key.parent.mkdir(parents=True)
    key.write_bytes(os.urandom(32))
    key.chmod(0o644)

    daemon.start(wait_ready=False)
    failed = daemon.wait_event("daemon.failed")
    status = daemon.wait_exit()

    assert (1, "InsecureFileError") == (status, failed["error_class"])
    assert "0644" in failed["error"]
    assert not os.path.exists(daemon.socket)
    assert [] == daemon.events("daemon.ready")
