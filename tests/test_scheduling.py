"""Specifications of the scheduler set-up: defaults, threads, late runs."""

from __future__ import annotations

import datetime
import threading
import time
from typing import TYPE_CHECKING, Any

import pytest
from apscheduler.events import EVENT_JOB_EXECUTED
from structlog.testing import capture_logs

from dynaconnd.scheduling import (
    SCHEDULER_THREAD_NAME,
    WORKER_THREAD_PREFIX,
    make_scheduler,
)
from tests.helpers import wait_for

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

UTC = datetime.UTC
FAR = datetime.datetime(2999, 1, 1, tzinfo=UTC)


@pytest.fixture
def started() -> Iterator[Callable[..., Any]]:
    """Yield a factory of started schedulers, all shut down afterwards."""
    schedulers: list[Any] = []

    def start(**options: Any) -> Any:
        scheduler = make_scheduler(**options)
        scheduler.start()
        schedulers.append(scheduler)
        return scheduler

    yield start
    for scheduler in schedulers:
        if scheduler.running:
            scheduler.shutdown(wait=False)


def _noop() -> None:
    """Do nothing; a job that only needs to exist."""


def _freeze(scheduler: Any, seconds: float) -> None:
    """Stall the scheduler's loop as a stopped process would be stalled."""
    # The loop takes this lock for every round; holding it freezes the
    # loop while the rest of the process carries on.
    with scheduler._jobstores_lock:
        time.sleep(seconds)


def test_jobs_get_explicit_defaults(started: Callable[..., Any]) -> None:
    """A job coalesces, never overlaps itself and has a 30 s grace time."""
    scheduler = started()

    job = scheduler.add_job(_noop, "date", run_date=FAR)

    expected = {"coalesce": True, "max_instances": 1, "grace": 30}
    assert expected == {
        "coalesce": job.coalesce,
        "max_instances": job.max_instances,
        "grace": job.misfire_grace_time,
    }


def test_grace_time_is_rounded_up_to_whole_seconds(
    started: Callable[..., Any],
) -> None:
    """APScheduler 3 counts grace in whole seconds, so 0.2 becomes 1."""
    scheduler = started(misfire_grace_time=0.2)

    job = scheduler.add_job(_noop, "date", run_date=FAR)

    expected = 1
    assert expected == job.misfire_grace_time


def test_scheduler_runs_on_utc() -> None:
    """The scheduler's clock is UTC whatever the machine's zone."""
    scheduler = make_scheduler()

    assert datetime.timedelta(0) == scheduler.timezone.utcoffset(None)


@pytest.mark.parametrize(
    ("options", "word"),
    [
        ({"max_workers": 0}, "max_workers"),
        ({"misfire_grace_time": 0}, "misfire"),
    ],
)
def test_invalid_options_are_refused(
    options: dict[str, Any], word: str
) -> None:
    """A pool without workers or a grace time of zero is a ValueError."""
    with pytest.raises(ValueError, match=word):
        make_scheduler(**options)


def test_threads_carry_dynaconn_names(started: Callable[..., Any]) -> None:
    """The scheduler thread and the pool's threads are named dynaconn-*."""
    scheduler = started()
    names: list[str] = []

    scheduler.add_job(lambda: names.append(threading.current_thread().name))
    wait_for(lambda: names, timeout=5, what="the job to run")

    thread_names = {thread.name for thread in threading.enumerate()}
    assert SCHEDULER_THREAD_NAME in thread_names
    assert names[0].startswith(WORKER_THREAD_PREFIX)


def test_shutdown_without_wait_returns_while_a_job_hangs(
    started: Callable[..., Any],
) -> None:
    """A job stuck on a dead host does not hold up shutdown(wait=False)."""
    scheduler = started()
    release = threading.Event()
    running = threading.Event()

    def hang() -> None:
        running.set()
        release.wait(10)

    scheduler.add_job(hang)
    assert running.wait(5)
    began = time.monotonic()
    scheduler.shutdown(wait=False)
    took = time.monotonic() - began
    release.set()

    assert took < 1.0, took


def test_run_delayed_by_a_frozen_scheduler_still_runs_once(
    started: Callable[..., Any],
) -> None:
    """Runs due while the loop was frozen collapse into one late run."""
    scheduler = started()
    runs: list[datetime.datetime] = []
    scheduler.add_listener(
        lambda event: runs.append(event.scheduled_run_time),
        EVENT_JOB_EXECUTED,
    )
    scheduler.add_job(_noop, "interval", seconds=0.25, id="tick")
    wait_for(lambda: runs, timeout=5, what="a first run")

    with capture_logs() as events:
        frozen_at = datetime.datetime.now(UTC)
        _freeze(scheduler, 1.3)
        thawed_at = datetime.datetime.now(UTC)
        wait_for(
            lambda: [run for run in runs if run > frozen_at],
            timeout=5,
            what="the late run",
        )

    during = [run for run in runs if frozen_at < run < thawed_at]
    expected_runs, expected_missed = 1, 0
    assert expected_runs == len(during), during
    assert expected_missed == sum(e["event"] == "job.missed" for e in events)


def test_run_later_than_the_grace_time_is_logged_as_missed(
    started: Callable[..., Any],
) -> None:
    """A run later than the grace time is skipped and says so, by job id."""
    scheduler = started(misfire_grace_time=1)
    ran = threading.Event()
    run_date = datetime.datetime.now(UTC) + datetime.timedelta(seconds=0.1)
    scheduler.add_job(ran.set, "date", run_date=run_date, id="health:crm:1")

    with capture_logs() as events:
        _freeze(scheduler, 1.6)
        wait_for(
            lambda: [e for e in events if e["event"] == "job.missed"],
            timeout=5,
            what="job.missed",
        )

    missed = [e for e in events if e["event"] == "job.missed"]
    expected = [
        {
            "component": "scheduling",
            "event": "job.missed",
            "log_level": "warning",
            "job_id": "health:crm:1",
            "scheduled_at": run_date.isoformat(),
        }
    ]
    assert expected == missed
    assert not ran.is_set()


def test_job_that_raises_is_logged_and_the_scheduler_goes_on(
    started: Callable[..., Any],
) -> None:
    """An escaping error is one job.failed event; later jobs still run."""
    scheduler = started()
    after = threading.Event()

    def fail() -> None:
        raise ValueError("bad unit")

    with capture_logs() as events:
        scheduler.add_job(fail, id="broken")
        wait_for(
            lambda: [e for e in events if e["event"] == "job.failed"],
            timeout=5,
            what="job.failed",
        )
        scheduler.add_job(after.set)
        assert after.wait(5)

    failed = [e for e in events if e["event"] == "job.failed"]
    expected = [("broken", "ValueError", "bad unit", "error")]
    assert expected == [
        (e["job_id"], e["error_class"], e["error"], e["log_level"])
        for e in failed
    ]
