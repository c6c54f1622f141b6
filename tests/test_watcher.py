"""Specifications for the config watcher: one callback per save."""
# The house style writes asserts as ``expected == actual``.

from __future__ import annotations

import dataclasses
import errno
import os
import resource
import shutil
import threading
import time
from typing import TYPE_CHECKING, Any

import pytest
from structlog.testing import capture_logs
from watchdog.observers.inotify import InotifyObserver

from dynaconnd import watcher as watcher_module
from dynaconnd.watcher import ConfigWatcher
from tests.helpers import wait_for

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from watchdog.observers.api import BaseObserver

V1 = "[main]\nsource = sqlite\nbase = one.db\n"
V2 = "[main]\nsource = sqlite\nbase = two.db\n"


@dataclasses.dataclass(frozen=True)
class Timing:
    """How a test's watcher watches, and how long a burst may take."""

    force_polling: bool
    debounce: float
    poll_interval: float = 1.0

    @property
    def quiet(self) -> float:
        """How long to wait to be sure no further callback comes."""
        return 3 * self.debounce


INOTIFY = Timing(force_polling=False, debounce=0.15)
# One save can straddle two polls, so the window must outlast a poll.
POLLING = Timing(force_polling=True, debounce=0.2, poll_interval=0.05)


class Recorder:
    """Count calls of ``on_change``; fail the first ``fail_first`` ones."""

    def __init__(self, *, fail_first: int = 0) -> None:
        self._lock = threading.Lock()
        self._calls = 0
        self._fail_first = fail_first

    def __call__(self) -> None:
        with self._lock:
            self._calls += 1
            failing = self._calls <= self._fail_first
        if failing:
            raise RuntimeError("on_change failed on purpose")

    def count(self) -> int:
        """Return how many times the recorder was called."""
        with self._lock:
            return self._calls


def settle(recorder: Recorder, *, at_least: int, quiet: float) -> int:
    """Wait for ``at_least`` callbacks, then return the count after quiet."""
    wait_for(
        lambda: recorder.count() >= at_least,
        timeout=5.0,
        what=f"{at_least} callback(s)",
    )

    # Only waiting out a window shows that no extra callback follows.
    time.sleep(quiet)
    return recorder.count()


def stays_quiet(recorder: Recorder, *, quiet: float) -> int:
    """Return the number of callbacks after waiting ``quiet`` seconds."""
    time.sleep(quiet)
    return recorder.count()


@pytest.fixture
def make_watcher() -> Iterator[Callable[..., ConfigWatcher]]:
    """Build and start watchers; stop them all when the test ends."""
    made: list[ConfigWatcher] = []

    def make(
        paths: list[Path],
        on_change: Callable[[], object],
        timing: Timing = INOTIFY,
        **options: Any,
    ) -> ConfigWatcher:
        watcher = ConfigWatcher(
            paths,
            on_change,
            debounce=timing.debounce,
            poll_interval=timing.poll_interval,
            force_polling=timing.force_polling,
            **options,
        )
        made.append(watcher)
        watcher.start()
        return watcher

    yield make
    for watcher in made:
        watcher.stop()


@pytest.fixture(params=[INOTIFY, POLLING], ids=["inotify", "polling"])
def timing(request: pytest.FixtureRequest) -> Timing:
    """Run a test once on inotify and once on polling."""
    chosen: Timing = request.param
    return chosen


# Save styles: each sets up source.ini in ``folder``, then saves ``text``.


def setup_plain(path: Path) -> None:
    """Write a plain file."""
    path.write_text(V1)


def save_by_rename(path: Path, text: str) -> None:
    """Write a temp file beside the file and rename it over the file."""
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(text)
    os.replace(temp, path)


def save_like_vim(path: Path, text: str) -> None:
    """Move the file to a backup, write a new one, remove the backup."""
    backup = path.with_name(f"{path.name}~")
    os.rename(path, backup)
    path.write_text(text)
    backup.unlink()


def save_in_place(path: Path, text: str) -> None:
    """Overwrite the file's content, keeping its inode."""
    with path.open("r+") as stream:
        stream.write(text)
        stream.truncate()


def save_by_delete_and_recreate(path: Path, text: str) -> None:
    """Remove the file, then write a new one."""
    path.unlink()
    path.write_text(text)


def setup_symlink(path: Path) -> None:
    """Make the file a symlink to a versioned file beside it."""
    target = path.with_name("source.v0.ini")
    target.write_text(V1)
    path.symlink_to(target.name)


def save_by_symlink_swap(path: Path, text: str) -> None:
    """Write a new version and rename a new symlink to it over the file."""
    target = path.with_name(f"source.{time.time_ns()}.ini")
    target.write_text(text)
    link = path.with_name(".source.ini.link")
    link.symlink_to(target.name)
    os.replace(link, path)


def publish_configmap(path: Path, text: str) -> None:
    """Publish ``text`` the way kubelet updates a mounted ConfigMap."""
    folder = path.parent
    data = folder / "..data"
    old = os.readlink(data) if data.is_symlink() else None

    stamped = folder / f"..{time.time_ns()}"
    stamped.mkdir()
    (stamped / path.name).write_text(text)
    link = folder / "..data_tmp"
    link.symlink_to(stamped.name)
    os.replace(link, data)

    if old is not None:
        shutil.rmtree(folder / old)
    if not path.is_symlink():
        path.symlink_to(f"..data/{path.name}")


SAVE_STYLES = {
    "rename": (setup_plain, save_by_rename),
    "vim": (setup_plain, save_like_vim),
    "in-place": (setup_plain, save_in_place),
    "delete-recreate": (setup_plain, save_by_delete_and_recreate),
    "symlink-swap": (setup_symlink, save_by_symlink_swap),
    "configmap": (lambda path: publish_configmap(path, V1), publish_configmap),
}


@pytest.mark.parametrize("style", list(SAVE_STYLES))
def test_each_save_style_gives_exactly_one_callback(
    tmp_path: Path,
    make_watcher: Callable[..., ConfigWatcher],
    timing: Timing,
    style: str,
) -> None:
    """A save in any common style gives one callback after the burst."""
    setup, save = SAVE_STYLES[style]
    path = tmp_path / "source.ini"
    setup(path)
    recorder = Recorder()
    watcher = make_watcher([path], recorder, timing)

    save(path, V2)

    assert 1 == settle(recorder, at_least=1, quiet=timing.quiet)
    assert V2 == path.read_text()
    assert ("polling" if timing.force_polling else "inotify") == watcher.mode


def test_three_saves_in_a_row_give_three_callbacks(
    tmp_path: Path, make_watcher: Callable[..., ConfigWatcher]
) -> None:
    """Rename, vim and rename again, each after the last settled: three."""
    path = tmp_path / "source.ini"
    path.write_text(V1)
    recorder = Recorder()
    make_watcher([path], recorder)

    for expected, save in enumerate(
        (save_by_rename, save_like_vim, save_by_rename), start=1
    ):
        save(path, f"{V2}; save {expected}\n")
        assert expected == settle(
            recorder, at_least=expected, quiet=INOTIFY.quiet
        )


def test_burst_of_twenty_writes_gives_one_callback(
    tmp_path: Path, make_watcher: Callable[..., ConfigWatcher]
) -> None:
    """Twenty quick in-place writes are one change, not twenty."""
    path = tmp_path / "source.ini"
    path.write_text(V1)
    recorder = Recorder()
    make_watcher([path], recorder)

    for number in range(20):
        save_in_place(path, f"{V2}; write {number}\n")
        time.sleep(0.005)

    assert 1 == settle(recorder, at_least=1, quiet=INOTIFY.quiet)


def test_reading_the_file_gives_no_callback(
    tmp_path: Path, make_watcher: Callable[..., ConfigWatcher]
) -> None:
    """The daemon's own reads of the file never look like a change."""
    path = tmp_path / "source.ini"
    path.write_text(V1)
    recorder = Recorder()
    make_watcher([path], recorder)

    for _ in range(5):
        assert V1 == path.read_text()

    assert 0 == stays_quiet(recorder, quiet=INOTIFY.quiet)


def test_other_files_in_the_folder_give_no_callback(
    tmp_path: Path, make_watcher: Callable[..., ConfigWatcher]
) -> None:
    """Writing, renaming and removing other files in the folder is ignored."""
    path = tmp_path / "source.ini"
    path.write_text(V1)
    recorder = Recorder()
    make_watcher([path], recorder)

    other = tmp_path / "notes.txt"
    other.write_text("x")
    save_by_rename(other, "y")
    other.unlink()
    (tmp_path / "sub").mkdir()

    assert 0 == stays_quiet(recorder, quiet=INOTIFY.quiet)


def test_in_place_write_to_symlink_target_elsewhere_gives_callback(
    tmp_path: Path, make_watcher: Callable[..., ConfigWatcher]
) -> None:
    """The folder of what a symlinked file points to is watched too."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = elsewhere / "real.ini"
    target.write_text(V1)
    path = tmp_path / "source.ini"
    path.symlink_to(target)
    recorder = Recorder()
    make_watcher([path], recorder)

    save_in_place(target, V2)

    assert 1 == settle(recorder, at_least=1, quiet=INOTIFY.quiet)


def test_configmap_swap_moves_the_watch_to_the_new_data_folder(
    tmp_path: Path, make_watcher: Callable[..., ConfigWatcher]
) -> None:
    """After a ``..data`` swap, writes inside the new folder are seen."""
    path = tmp_path / "source.ini"
    publish_configmap(path, V1)
    recorder = Recorder()
    make_watcher([path], recorder)
    publish_configmap(path, V2)
    assert 1 == settle(recorder, at_least=1, quiet=INOTIFY.quiet)

    save_in_place(path.resolve(), V1)

    assert 2 == settle(recorder, at_least=2, quiet=INOTIFY.quiet)


def test_callback_that_raises_does_not_stop_later_callbacks(
    tmp_path: Path, make_watcher: Callable[..., ConfigWatcher]
) -> None:
    """A failing on_change is logged once and the next save still counts."""
    path = tmp_path / "source.ini"
    path.write_text(V1)
    recorder = Recorder(fail_first=1)

    with capture_logs() as events:
        watcher = make_watcher([path], recorder)
        save_by_rename(path, V2)
        settle(recorder, at_least=1, quiet=INOTIFY.quiet)
        save_by_rename(path, V1)
        settle(recorder, at_least=2, quiet=INOTIFY.quiet)

    failures = [
        {key: event[key] for key in ("error", "where", "log_level")}
        for event in events
        if "watcher.callback_failed" == event["event"]
    ]
    assert [
        {"error": "RuntimeError", "where": "on_change", "log_level": "error"}
    ] == failures
    assert 2 == recorder.count()
    assert watcher.is_alive()


def test_handler_that_raises_does_not_kill_the_observer(
    tmp_path: Path,
    make_watcher: Callable[..., ConfigWatcher],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An error while sorting an event is logged and watching goes on."""
    path = tmp_path / "source.ini"
    path.write_text(V1)
    recorder = Recorder()
    watcher = make_watcher([path], recorder)
    real_lookups = watcher_module._lookups
    failed = threading.Event()

    def lookups_failing_once(
        path: str,
    ) -> tuple[frozenset[tuple[str, str]], list[str]]:
        if not failed.is_set():
            failed.set()
            raise ValueError("sorting failed on purpose")
        return real_lookups(path)

    monkeypatch.setattr(watcher_module, "_lookups", lookups_failing_once)
    with capture_logs() as events:
        save_by_rename(path, V2)
        wait_for(failed.is_set, what="the handler to fail")
        stays_quiet(recorder, quiet=INOTIFY.quiet)
        save_by_rename(path, V1)
        settle(recorder, at_least=1, quiet=INOTIFY.quiet)

    failures = [
        (event["error"], event["where"])
        for event in events
        if "watcher.callback_failed" == event["event"]
    ]
    assert [("ValueError", "handler")] == failures
    assert watcher.is_alive()


def test_force_polling_watches_by_polling(
    tmp_path: Path, make_watcher: Callable[..., ConfigWatcher]
) -> None:
    """``force_polling`` starts in polling mode and says so."""
    path = tmp_path / "source.ini"
    path.write_text(V1)

    with capture_logs() as events:
        watcher = make_watcher([path], Recorder(), POLLING)

    started = [e for e in events if "watcher.started" == e["event"]]
    assert "polling" == watcher.mode
    assert ["polling"] == [event["mode"] for event in started]


def starved_inotify() -> BaseObserver:
    """Build an inotify observer while this process has no free fd."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    probe = os.open(os.devnull, os.O_RDONLY)
    os.close(probe)

    # Every fd below the lowest free one is taken, so with that as the
    # limit inotify_init() fails with EMFILE, as at the instance limit.
    # Only this process is affected, and only for this one call.
    resource.setrlimit(resource.RLIMIT_NOFILE, (probe, hard))
    try:
        return InotifyObserver()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def full_watch_table() -> BaseObserver:
    """Fail as watchdog does when fs.inotify.max_user_watches is reached."""
    raise OSError(errno.ENOSPC, "inotify watch limit reached")


@pytest.mark.parametrize(
    ("factory", "limit", "sysctl"),
    [
        (
            starved_inotify,
            "max_user_instances",
            "fs.inotify.max_user_instances",
        ),
        (full_watch_table, "max_user_watches", "fs.inotify.max_user_watches"),
    ],
    ids=["instances", "watches"],
)
def test_inotify_limit_falls_back_to_polling(
    tmp_path: Path,
    make_watcher: Callable[..., ConfigWatcher],
    factory: Callable[[], BaseObserver],
    limit: str,
    sysctl: str,
) -> None:
    """Out of inotify, one error names the sysctl and polling takes over."""
    path = tmp_path / "source.ini"
    path.write_text(V1)
    recorder = Recorder()
    polling_timing = dataclasses.replace(POLLING, force_polling=False)

    with capture_logs() as events:
        watcher = make_watcher(
            [path], recorder, polling_timing, observer_factory=factory
        )
    save_by_rename(path, V2)

    unavailable = [
        (event["limit"], event["sysctl"], event["log_level"])
        for event in events
        if "watcher.inotify_unavailable" == event["event"]
    ]
    assert [(limit, sysctl, "error")] == unavailable
    assert "polling" == watcher.mode
    assert 1 == settle(recorder, at_least=1, quiet=POLLING.quiet)


def test_stop_joins_every_thread(
    tmp_path: Path, make_watcher: Callable[..., ConfigWatcher]
) -> None:
    """After stop() no thread of the watcher is left running."""
    path = tmp_path / "source.ini"
    path.write_text(V1)
    watcher = make_watcher([path], Recorder())
    names = sorted(
        thread.name
        for thread in threading.enumerate()
        if thread.name.startswith("dynaconn-watcher")
    )
    assert watcher.is_alive()

    watcher.stop()

    assert [
        "dynaconn-watcher-debounce",
        "dynaconn-watcher-emitter",
        "dynaconn-watcher-observer",
    ] == names
    assert [] == [
        thread.name
        for thread in threading.enumerate()
        if thread.name.startswith("dynaconn-watcher")
    ]
    assert not watcher.is_alive()


def test_recreated_folder_makes_watcher_not_alive_until_restarted(
    tmp_path: Path,
    make_watcher: Callable[..., ConfigWatcher],
    timing: Timing,
) -> None:
    """A folder removed and made again is unheard; restart() recovers."""
    folder = tmp_path / "etc"
    folder.mkdir()
    path = folder / "source.ini"
    path.write_text(V1)
    recorder = Recorder()
    watcher = make_watcher([path], recorder, timing)

    shutil.rmtree(folder)
    settle(recorder, at_least=1, quiet=0)
    folder.mkdir()
    path.write_text(V1)
    wait_for(lambda: not watcher.is_alive(), what="the watcher to go deaf")
    watcher.restart()
    before = recorder.count()
    save_by_rename(path, V2)

    assert watcher.is_alive()
    assert before + 1 == settle(
        recorder, at_least=before + 1, quiet=timing.quiet
    )


def test_set_paths_adds_a_password_file_in_another_folder(
    tmp_path: Path, make_watcher: Callable[..., ConfigWatcher]
) -> None:
    """A path added later, in a folder not yet watched, gives callbacks."""
    path = tmp_path / "source.ini"
    path.write_text(V1)
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    password = secrets / "crm.password"
    password.write_text("old")
    recorder = Recorder()
    watcher = make_watcher([path], recorder)

    watcher.set_paths([path, password])
    save_by_rename(password, "new")

    assert 1 == settle(recorder, at_least=1, quiet=INOTIFY.quiet)
    assert watcher.is_alive()


def test_set_paths_stops_watching_a_dropped_path(
    tmp_path: Path, make_watcher: Callable[..., ConfigWatcher]
) -> None:
    """A path no longer listed gives no more callbacks."""
    path = tmp_path / "source.ini"
    path.write_text(V1)
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    password = secrets / "crm.password"
    password.write_text("old")
    recorder = Recorder()
    watcher = make_watcher([path, password], recorder)

    watcher.set_paths([path])
    save_by_rename(password, "new")

    assert 0 == stays_quiet(recorder, quiet=INOTIFY.quiet)


def test_start_raises_when_the_folder_is_missing(tmp_path: Path) -> None:
    """A path in a missing folder cannot be watched and starts nothing."""
    watcher = ConfigWatcher([tmp_path / "absent" / "source.ini"], Recorder())

    with pytest.raises(FileNotFoundError):
        watcher.start()

    assert not watcher.is_alive()


def test_set_paths_skips_a_missing_folder_and_keeps_watching(
    tmp_path: Path, make_watcher: Callable[..., ConfigWatcher]
) -> None:
    """A password file in a missing folder is reported, not fatal."""
    path = tmp_path / "source.ini"
    path.write_text(V1)
    missing = tmp_path / "absent" / "crm.password"
    recorder = Recorder()
    watcher = make_watcher([path], recorder)

    with capture_logs() as events:
        watcher.set_paths([path, missing])
    save_by_rename(path, V2)

    warnings = [
        (event["folder"], event["log_level"])
        for event in events
        if "watcher.folder_missing" == event["event"]
    ]
    assert [(str(missing.parent), "warning")] == warnings
    assert 1 == settle(recorder, at_least=1, quiet=INOTIFY.quiet)
    assert watcher.is_alive()
